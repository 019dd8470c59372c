"""The BPF LSM backend (bpf/exec_lsm.c): the kernel denies an untrusted exec with EPERM.

``bprm_check_security`` reads the verdict map that user space fills; it never waits for
Python (ARCHITECTURE.md decision 3). Only files on devices in scope are ever denied. The
program uses no ``bpf_probe_read_kernel*`` (decision 2), so it loads under
``lockdown=confidentiality``: struct offsets come from this kernel's BTF as ``-D`` cflags,
and the C side reads them with typed direct loads.

Typical use::

    with BpfLsmSensor() as lsm:
        lsm.add_scope_dev(os.stat(scope_mount).st_dev)
        lsm.set_mode(enforce=True, deny_unknown=True)
        lsm.set_verdict(identity, allow=True)     # from the pre-scan, fanotify, or a poll
        for rec in lsm.poll(timeout_ms=100):      # List[LsmRecord]
            ...
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Set, Tuple

from agent.decision import FileIdentity
from agent.sensors.bpf_exec import (
    BPF_DIR,
    SensorConfig,
    _captured_stderr,
    _explain,
    _header_warnings,
)
from agent.sensors.decode import ExecRecord, RecordDecoder, st_dev_to_kernel_dev
from agent.sensors.errors import SensorMapError, SensorUnavailable
from agent.sensors.kernel_layout import (
    _FIXED_EXTRA,
    _PER_MEMBER,
    VMLINUX_BTF,
    Btf,
    LayoutError,
    exec_sensor_offsets,
)

BACKEND = "bpf-lsm"
SOURCE = "exec_lsm.c"
VERDICT_ALLOW, VERDICT_DENY = 1, 2  # EG_VERDICT_* in bpf/events.h
CFG_ENFORCE, CFG_DENY_UNKNOWN = 0x01, 0x02  # EG_LSM_CFG_* in bpf/exec_lsm.c
F_EPERM = 0x08  # eg_exec_event.flags: the hook returned -EPERM
STAT_NAMES = ("execs", "drops", "denied", "invalidated", "in_scope")  # EG_LSM_STAT_* order
_KIND_FUNC, _KIND_FUNC_PROTO = 12, 13
DEFAULT_CONFIG = SensorConfig(ringbuf_pages=256)  # 1 MiB: ~3,100 records of backlog


@dataclass(frozen=True)
class LsmRecord:
    """One exec in scope as bprm_check_security saw it."""

    record: ExecRecord  # event (backend "bpf-lsm"), state, in_scope, denied
    eperm: bool  # the hook returned -EPERM: the exec failed


@dataclass(frozen=True)
class LsmStats:
    execs: int  # bprm_check_security runs (every exec on the host)
    in_scope: int
    denied: int  # -EPERM returned
    invalidated: int  # verdicts dropped by write-open, truncate or setattr
    drops: int  # ring buffer full: the record is lost (the verdict still applied)
    decoded: int
    short_records: int
    unknown_records: int


def func_params(blob: bytes, name: str) -> Optional[int]:
    """How many parameters the BTF function ``name`` takes (None when BTF lacks it)."""
    try:
        _magic, _v, _f, hdr_len = struct.unpack_from("<HBBI", blob, 0)
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        types = blob[hdr_len + type_off : hdr_len + type_off + type_len]
        strings = blob[hdr_len + str_off : hdr_len + str_off + str_len]
        want = name.encode() + b"\0"
        protos: Dict[int, int] = {}
        target: Optional[int] = None
        pos, tid = 0, 0
        while pos < len(types):
            name_off, info, size_or_type = struct.unpack_from("<III", types, pos)
            tid += 1
            pos += 12
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind == _KIND_FUNC_PROTO:
                protos[tid] = vlen
            elif kind == _KIND_FUNC and strings[name_off : name_off + len(want)] == want:
                target = size_or_type
            pos += _FIXED_EXTRA.get(kind, 0) + _PER_MEMBER.get(kind, 0) * vlen
    except struct.error as exc:
        raise LayoutError(f"malformed BTF while looking for {name}: {exc}") from exc
    return protos.get(target) if target is not None else None


def verdict_offsets(btf: Btf, blob: bytes, setattr_func: str) -> Dict[str, int]:
    """The ``EG_*`` macros bpf/exec_verdict.h needs, from this kernel's BTF; the setattr hook
    (``setattr_func``, whose parameter count changed across kernels) is counted in BTF."""
    out = exec_sensor_offsets(btf)
    out.pop("EG_OFF_BPRM_FILENAME", None)  # the path comes from bpf_d_path instead
    out["EG_OFF_FILE_PATH"] = btf.require("file", "f_path", 16).offset
    out["EG_OFF_FILE_MODE"] = btf.require("file", "f_mode", 4).offset
    out["EG_OFF_FILE_FLAGS"] = btf.require("file", "f_flags", 4).offset
    out["EG_OFF_PATH_DENTRY"] = btf.require("path", "dentry", 8).offset
    out["EG_OFF_DENTRY_INODE"] = btf.require("dentry", "d_inode", 8).offset
    nargs = func_params(blob, setattr_func)
    if nargs is None or nargs not in (2, 3):
        raise LayoutError(f"{btf.source}: {setattr_func} has {nargs} parameters, "
                          "expected 2 (dentry, attr) or 3 (idmap first)")
    out["EG_SETATTR_ARGS"] = nargs
    return out


def lsm_offsets(btf: Btf, blob: bytes) -> Dict[str, int]:
    """The ``EG_*`` macros bpf/exec_lsm.c needs (its setattr hook gained an idmap in 6.8)."""
    return verdict_offsets(btf, blob, "bpf_lsm_inode_setattr")


OffsetsFn = Callable[[Btf, bytes], Dict[str, int]]


def build_cflags(config: SensorConfig, btf_path: str = VMLINUX_BTF,
                 offsets: Optional[Dict[str, int]] = None, backend: str = BACKEND,
                 offsets_fn: OffsetsFn = lsm_offsets) -> List[str]:
    """Include dir, knobs (validated by SensorConfig) and this kernel's offsets."""
    if offsets is None:
        try:
            with open(btf_path, "rb") as f:
                blob = f.read()
            offsets = offsets_fn(Btf(blob, btf_path), blob)
        except OSError as exc:
            raise SensorUnavailable(backend, f"{btf_path}: cannot read kernel BTF: "
                                    f"{exc.strerror}", f"{backend} needs CONFIG_DEBUG_INFO_BTF=y"
                                    ) from exc
        except LayoutError as exc:
            raise SensorUnavailable(backend, f"cannot read struct offsets: {exc}") from exc
    flags = [f"-I{BPF_DIR}", *config.cflags()]
    return flags + [f"-D{k}={int(v)}" for k, v in sorted(offsets.items())]


SHARED = "exec_verdict.h"
SHARED_INCLUDE = f'#include "{SHARED}"'


def program_text(source: str) -> str:
    """``bpf/<source>`` with bpf/exec_verdict.h pasted in place of its ``#include``.

    BCC rewrites map calls (``verdicts.lookup(&key)`` -> ``bpf_map_lookup_elem(fd, ...)``)
    in the main file only; in an included header they stay calls through a function pointer,
    which the kernel refuses ("unknown opcode 8d", an indirect call). So the shared code
    reaches BCC as part of the main text, and stays one file in the tree."""
    with open(os.path.join(BPF_DIR, source), encoding="utf-8") as f:
        text = f.read()
    with open(os.path.join(BPF_DIR, SHARED), encoding="utf-8") as f:
        shared = f.read()
    lines = text.split("\n")
    at = [i for i, line in enumerate(lines) if line.strip() == SHARED_INCLUDE]
    if len(at) != 1:
        raise SensorUnavailable(BACKEND, f"{source}: expected one {SHARED_INCLUDE} line, "
                                f"found {len(at)}")
    lines[at[0]] = f"/* ---- {SHARED}, pasted by agent/sensors/bpf_lsm.py ---- */\n{shared}"
    return "\n".join(lines)


def print_bpf(config: SensorConfig = DEFAULT_CONFIG) -> str:
    """The program text and cflags BCC would compile (for ``execguard doctor --print-bpf``)."""
    return f"// cflags: {' '.join(build_cflags(config))}\n{program_text(SOURCE)}"


class BpfLsmSensor:
    """Loaded and attached on construction (mode: allow everything); ``close()`` detaches,
    and the kernel then denies nothing (fail-open, decision 6).

    Subclasses change the program (``source``), its name (``backend``), the offsets it needs
    and how its verdict hook attaches (``_attach``); maps, records and modes are shared."""

    backend = BACKEND
    source = SOURCE
    offsets_fn: OffsetsFn = staticmethod(lsm_offsets)  # type: ignore[assignment]
    refused_hint = ("this kernel does not let BPF LSM programs load (lockdown policy or a "
                    "hardened kernel); run execguard doctor")

    def __init__(self, config: SensorConfig = DEFAULT_CONFIG,
                 offsets: Optional[Dict[str, int]] = None) -> None:
        self.cflags = build_cflags(config, offsets=offsets, backend=self.backend,
                                   offsets_fn=type(self).offsets_fn)
        self._records: List[LsmRecord] = []
        self._scope_devs: Set[int] = set()
        self._mode = (False, False)
        self._decoder = RecordDecoder(_realtime_offset(), backend=self.backend)
        try:
            import bcc
        except ImportError as exc:
            raise SensorUnavailable(self.backend, f"import bcc failed: {exc}",
                                    "install python3-bpfcc (scripts/setup.sh)") from exc
        self.warnings = _header_warnings()
        log: List[str] = []
        try:
            with _captured_stderr() as log:
                text = program_text(self.source).encode()  # BCC deprecates str source
                self._bpf: Any = bcc.BPF(text=text, cflags=self.cflags)
                self._attach(bcc)
        except Exception as exc:  # BCC raises bare Exception for compile, load and attach
            self.close()
            cause, hint = _explain(exc, log)
            if os.geteuid() == 0 and ("privileges" in cause or "not permitted" in cause):
                cause = (f"the kernel refused the {self.backend} program although we run as "
                         f"root ({cause[:200]})")
                hint = self.refused_hint
            raise SensorUnavailable(self.backend, cause, hint) from exc
        try:
            self._bpf[b"events"].open_ring_buffer(self._on_ring)
            self._verdicts = self._bpf[b"verdicts"]
            self._scope = self._bpf[b"scope_devs"]
            self._config = self._bpf[b"config"]
            self._stats = self._bpf[b"stats"]
            self.set_mode(enforce=False, deny_unknown=False)
        except Exception as exc:
            self.close()
            raise SensorUnavailable(self.backend, f"ring buffer or maps: {exc}") from exc

    def _attach(self, bcc: Any) -> None:
        """Attach what BCC's constructor does not: LSM_PROBE programs attach themselves."""

    def close(self) -> None:
        bpf = getattr(self, "_bpf", None)
        if bpf is not None:
            self._bpf = None
            self._detach()
            bpf.cleanup()

    def _detach(self) -> None:
        """Undo ``_attach`` (before BCC's cleanup closes the programs)."""

    def __enter__(self) -> BpfLsmSensor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_ring(self, _ctx: Any, data: Any, size: int) -> int:
        try:
            raw = ctypes.string_at(data, size)
            rec = self._decoder.decode(raw)
            if rec is not None:
                self._records.append(LsmRecord(rec, bool(raw[3] & F_EPERM)))
        except Exception:  # the decoder counts bad records; this guards the C callback
            self._decoder.stats.short += 1
        return 0

    def poll(self, timeout_ms: int) -> List[LsmRecord]:
        """Wait up to ``timeout_ms`` for a wake-up, then drain every record (cache hits are
        submitted without a wake-up, so call this at least every ~100 ms)."""
        if self._bpf is None:
            raise SensorUnavailable(self.backend, "sensor is closed")
        self._decoder.realtime_offset_ns = _realtime_offset()
        self._bpf.ring_buffer_poll(int(timeout_ms))
        self._bpf.ring_buffer_consume()
        out, self._records = self._records, []
        return out

    @contextlib.contextmanager
    def _map_op(self, operation: str) -> Iterator[None]:
        if self._bpf is None:
            raise SensorMapError(self.backend, operation, "sensor is closed")
        try:
            yield
        except KeyError:
            raise
        except Exception as exc:  # BCC: E2BIG when full, EBADF when closed
            raise SensorMapError(self.backend, operation, str(exc)) from exc

    def _key(self, identity: FileIdentity) -> Any:
        return self._verdicts.Key(ino=identity.ino, dev=st_dev_to_kernel_dev(identity.dev))

    def set_verdict(self, identity: FileIdentity, allow: bool) -> None:
        """A verdict for this exact file version (dev, ino, ctime ns, size)."""
        leaf = self._verdicts.Leaf(ctime_ns=identity.ctime_ns, size=identity.size,
                                   verdict=VERDICT_ALLOW if allow else VERDICT_DENY)
        with self._map_op("set_verdict"):
            self._verdicts[self._key(identity)] = leaf

    def verdict(self, identity: FileIdentity) -> Optional[bool]:
        """The map's verdict for this exact version: True/False, None when absent or stale."""
        with self._map_op("verdict"):
            try:
                leaf = self._verdicts[self._key(identity)]
            except KeyError:
                return None
        if (leaf.ctime_ns, leaf.size) != (identity.ctime_ns, identity.size):
            return None
        return bool(leaf.verdict == VERDICT_ALLOW)

    def forget(self, identity: FileIdentity) -> None:
        with self._map_op("forget"), contextlib.suppress(KeyError):
            del self._verdicts[self._key(identity)]

    def clear_verdicts(self) -> int:
        """Drop every verdict (a policy reload: none decided under the old policy stands).
        Returns how many were dropped; an exec racing this sees its file as unknown."""
        dropped = 0
        with self._map_op("clear_verdicts"):
            for key in list(self._verdicts.keys()):
                with contextlib.suppress(KeyError):
                    del self._verdicts[key]
                    dropped += 1
        return dropped

    def add_scope_dev(self, st_dev: int) -> None:
        """Enforce on every file of this filesystem (``stat().st_dev``); add only devices
        whose every executable is in the policy's scope (a dedicated mount or tmpfs)."""
        kdev = st_dev_to_kernel_dev(st_dev)
        with self._map_op("add_scope_dev"):
            self._scope[ctypes.c_uint32(kdev)] = ctypes.c_uint32(1)
        self._scope_devs.add(st_dev)

    def remove_scope_dev(self, st_dev: int) -> None:
        kdev = st_dev_to_kernel_dev(st_dev)
        with self._map_op("remove_scope_dev"), contextlib.suppress(KeyError):
            del self._scope[ctypes.c_uint32(kdev)]
        self._scope_devs.discard(st_dev)

    @property
    def scope(self) -> FrozenSet[int]:
        return frozenset(self._scope_devs)

    def set_mode(self, *, enforce: bool, deny_unknown: bool) -> None:
        """enforce: deny verdicts in scope get EPERM. deny_unknown: so do unknown files."""
        flags = (CFG_ENFORCE if enforce else 0) | (CFG_DENY_UNKNOWN if deny_unknown else 0)
        with self._map_op("set_mode"):
            self._config[ctypes.c_int(0)] = self._config.Leaf(flags=flags)
        self._mode = (enforce, deny_unknown)

    @property
    def mode(self) -> Tuple[bool, bool]:
        return self._mode

    def stats(self) -> LsmStats:
        if self._bpf is None:
            k = dict.fromkeys(STAT_NAMES, 0)
        else:
            k = {n: int(self._stats.sum(ctypes.c_int(i)).value)
                 for i, n in enumerate(STAT_NAMES)}
        d = self._decoder.stats
        return LsmStats(k["execs"], k["in_scope"], k["denied"], k["invalidated"], k["drops"],
                        d.decoded, d.short, d.unknown_op)


def _realtime_offset() -> int:
    return time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(
        time.CLOCK_BOOTTIME)
