"""The BPF LSM backend (exec_lsm.c): the kernel denies an untrusted exec with EPERM.

``bprm_check_security`` reads the verdict map that user space fills; it never waits for
Python (docs/architecture.md decision 3). Only files on devices in scope are ever denied. The
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

import ctypes
import os
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterable, List, Optional, Tuple

from agent.sensors.bpf.build import OffsetsFn as OffsetsFn
from agent.sensors.bpf.build import SensorConfig
from agent.sensors.bpf.build import build_cflags as _build_cflags
from agent.sensors.bpf.build import program_text as _program_text
from agent.sensors.bpf.pins import GUARD_DIR, PinSet, obj_id
from agent.sensors.bpf.sensor import CFG_BPF_LOAD, CFG_PROTECT, VERDICT_STAT_NAMES, BpfSensor
from agent.sensors.bpf.sensor import Guards as Guards  # where runners have imported it from
from agent.sensors.decode import ExecRecord, st_dev_to_kernel_dev
from agent.sensors.kernel_layout import (
    _FIXED_EXTRA,
    _PER_MEMBER,
    VMLINUX_BTF,
    Btf,
    LayoutError,
    exec_sensor_offsets,
    inode_time_offsets,
)

BACKEND = "bpf-lsm"
SOURCE = "exec_lsm.c"
F_EPERM = 0x08  # eg_exec_event.flags: the hook returned -EPERM
STAT_NAMES = VERDICT_STAT_NAMES  # EG_LSM_STAT_*
_KIND_FUNC, _KIND_FUNC_PROTO = 12, 13
IDF_GUARDED, IDF_READABLE = 1, 2  # EG_IDF_* in exec_verdict.h
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
    maps: int = 0  # PROT_EXEC mappings of files in scope judged
    maps_denied: int = 0
    loader_denied: int = 0
    mounts_refused: int = 0
    ptrace_refused: int = 0
    epochs: int = 0  # directory renames that made every verdict stale (path rules)
    orphan_denied: int = 0  # denials after the agent's process was freed (pinned programs)
    tamper_refused: int = 0  # attempts on the agent refused by self-protection


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
    """The ``EG_*`` macros exec_verdict.h needs, from this kernel's BTF; the setattr hook
    (``setattr_func``, whose parameter count changed across kernels) is counted in BTF."""
    out = exec_sensor_offsets(btf)
    out.pop("EG_OFF_BPRM_FILENAME", None)  # the path comes from bpf_d_path instead
    out["EG_OFF_FILE_PATH"] = btf.require("file", "f_path", 16).offset
    out["EG_OFF_FILE_MODE"] = btf.require("file", "f_mode", 4).offset
    out["EG_OFF_FILE_FLAGS"] = btf.require("file", "f_flags", 4).offset
    # an overlay file's open real file (exec_verdict.h eg_layer_state)
    out["EG_OFF_FILE_PRIVATE_DATA"] = btf.require("file", "private_data", 8).offset
    out["EG_OFF_PATH_DENTRY"] = btf.require("path", "dentry", 8).offset
    out["EG_OFF_DENTRY_INODE"] = btf.require("dentry", "d_inode", 8).offset
    # where a file is: its directory ancestors within the filesystem, and the fs root
    out["EG_OFF_DENTRY_PARENT"] = btf.require("dentry", "d_parent", 8).offset
    out["EG_OFF_SB_ROOT"] = btf.require("super_block", "s_root", 8).offset
    # an overlay's layer file (exec_verdict.h eg_note_layer): the filesystem's magic
    out["EG_OFF_SB_MAGIC"] = btf.require("super_block", "s_magic", 8).offset
    # what the file is: name count (0: no path), type, writers, and the mtime that stands
    # for the bytes after a rename
    out["EG_OFF_INODE_NLINK"] = btf.require("inode", "i_nlink", 4).offset
    out["EG_OFF_INODE_MODE"] = btf.require("inode", "i_mode", 2).offset
    out["EG_OFF_INODE_WRITECOUNT"] = btf.require("inode", "i_writecount", 4).offset
    out.update(inode_time_offsets(btf, "mtime"))
    # mappings and ptrace: the file behind a mapping, a process's program
    out["EG_OFF_VMA_FILE"] = btf.require("vm_area_struct", "vm_file", 8).offset
    out["EG_OFF_VMA_FLAGS"] = btf.require("vm_area_struct", "vm_flags", 8).offset
    out["EG_OFF_TASK_MM"] = btf.require("task_struct", "mm", 8).offset
    out["EG_OFF_MM_EXE_FILE"] = btf.require("mm_struct", "exe_file", 8).offset
    # whether a mount reaches the agent (the mount guards): its propagation, the caller's
    # mount namespace
    out["EG_OFF_PATH_MNT"] = btf.require("path", "mnt", 8).offset
    out["EG_OFF_VFSMOUNT_FLAGS"] = btf.require("vfsmount", "mnt_flags", 4).offset
    out["EG_OFF_TASK_NSPROXY"] = btf.require("task_struct", "nsproxy", 8).offset
    out["EG_OFF_NSPROXY_MNT_NS"] = btf.require("nsproxy", "mnt_ns", 8).offset
    out["EG_OFF_MNT_NS_INUM"] = (btf.require("mnt_namespace", "ns").offset
                                 + btf.require("ns_common", "inum", 4).offset)
    # READ_IMPLIES_EXEC: the kernel adds PROT_EXEC to a PROT_READ mapping of such a process
    out["EG_OFF_TASK_PERSONALITY"] = btf.require("task_struct", "personality", 4).offset
    # the agent is its tgid AND its start time: pinned programs outlive it, its pid may not
    out["EG_OFF_TASK_GROUP_LEADER"] = btf.require("task_struct", "group_leader", 8).offset
    out["EG_OFF_TASK_START_BOOTTIME"] = btf.require("task_struct", "start_boottime", 8).offset
    out["EG_TICK_NS"] = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    nargs = func_params(blob, setattr_func)
    if nargs is None or nargs not in (2, 3):
        raise LayoutError(f"{btf.source}: {setattr_func} has {nargs} parameters, "
                          "expected 2 (dentry, attr) or 3 (idmap first)")
    out["EG_SETATTR_ARGS"] = nargs
    return out


def lsm_offsets(btf: Btf, blob: bytes) -> Dict[str, int]:
    """The ``EG_*`` macros exec_lsm.c needs (its setattr hook gained an idmap in 6.8),
    with those of its self-protection hooks: the ids of BPF objects, a mount's filesystem."""
    out = verdict_offsets(btf, blob, "bpf_lsm_inode_setattr")
    out["EG_OFF_MAP_ID"] = btf.require("bpf_map", "id", 4).offset
    out["EG_OFF_PROG_AUX"] = btf.require("bpf_prog", "aux", 8).offset
    out["EG_OFF_PROG_AUX_ID"] = btf.require("bpf_prog_aux", "id", 4).offset
    out["EG_OFF_VFSMOUNT_SB"] = btf.require("vfsmount", "mnt_sb", 8).offset
    out["EG_OFF_TASK_PID"] = btf.require("task_struct", "pid", 4).offset
    return out


def build_cflags(config: SensorConfig, btf_path: str = VMLINUX_BTF,
                 offsets: Optional[Dict[str, int]] = None, backend: str = BACKEND,
                 offsets_fn: OffsetsFn = lsm_offsets) -> List[str]:
    """Include dir, knobs (validated by SensorConfig) and this kernel's offsets."""
    return _build_cflags(config, backend, offsets_fn, btf_path=btf_path, offsets=offsets)


def program_text(source: str) -> str:
    """``programs/<source>`` with exec_verdict.h pasted in place of its ``#include``
    (agent/sensors/bpf/build.py says why)."""
    return _program_text(source, BACKEND)


def print_bpf(config: SensorConfig = DEFAULT_CONFIG) -> str:
    """The program text and cflags BCC would compile (for ``execguard doctor --print-bpf``)."""
    return f"// cflags: {' '.join(build_cflags(config))}\n{program_text(SOURCE)}"


class BpfLsmSensor(BpfSensor):
    """Loaded and attached on construction (mode: allow everything); ``close()`` detaches,
    and the kernel then denies nothing (fail-open, decision 6). Maps, scope, modes and the
    ring are the shared base's (agent/sensors/bpf/sensor.py); subclasses change the program
    (``source``), its name (``backend``), the offsets it needs and the hooks the loader
    attaches by name (``tracing_hooks``)."""

    backend = BACKEND
    source = SOURCE
    self_protection: ClassVar[bool] = True  # its program has the EG_PROTECT hooks
    offsets_fn = staticmethod(lsm_offsets)  # type: ignore[assignment]
    default_config = DEFAULT_CONFIG
    btf_hint = f"{BACKEND} needs CONFIG_DEBUG_INFO_BTF=y"
    refused_hint = ("this kernel does not let BPF LSM programs load (lockdown policy or a "
                    "hardened kernel); run execguard doctor")

    def _wrap(self, raw: bytes, rec: ExecRecord) -> LsmRecord:
        return LsmRecord(rec, bool(raw[3] & F_EPERM))

    # -- self-protection (exec_verdict.h EG_PROTECT) ------------------------------------

    def protect(self, pins: PinSet, guarded: Iterable[Tuple[int, int, int]],
                bpf_load: bool = True) -> Dict[str, Any]:
        """Refuse, to every process but the agent: its pins (``pins``), the files and
        directories in ``guarded`` ((st_dev, st_ino, EG_GUARD_* flags)), every map,
        program and link of this program by id (the counters may be read), signals,
        ptrace and limits aimed at the agent and its children and, with ``bpf_load``,
        loading programs that run in other processes' context. Returns what it
        registered."""
        maps, progs = self.object_fds()
        stats_id = obj_id(self.stats_fd())
        ids = [(1, obj_id(fd)) for fd in maps] + [(2, obj_id(fd)) for fd in progs] + \
              [(3, obj_id(fd)) for fd in pins.link_fds.values()]
        entries: Dict[Tuple[int, int], int] = {}
        for dev, ino, flags in [*pins.inodes(), *guarded]:
            entries[(dev, ino)] = entries.get((dev, ino), 0) | flags
        table, by_id, devs = self._bpf[b"guarded"], self._bpf[b"guarded_ids"], \
            self._bpf[b"guarded_devs"]
        with self._map_op("protect"):
            for (dev, ino), flags in entries.items():
                table[table.Key(ino=ino, dev=st_dev_to_kernel_dev(dev))] = ctypes.c_uint32(flags)
                if flags & GUARD_DIR:
                    devs[ctypes.c_uint32(st_dev_to_kernel_dev(dev))] = ctypes.c_uint32(1)
            for kind, oid in ids:
                readable = IDF_READABLE if (kind, oid) == (1, stats_id) else 0
                by_id[ctypes.c_uint64(kind << 32 | oid)] = ctypes.c_uint32(IDF_GUARDED | readable)
            cell = self._runtime[ctypes.c_int(0)]
            cell.pin_dev = st_dev_to_kernel_dev(os.stat(pins.directory).st_dev)
            cell.agent_mnt_ns = os.stat("/proc/self/ns/mnt").st_ino
            self._runtime[ctypes.c_int(0)] = cell
        self._set_protect_flags(CFG_PROTECT | (CFG_BPF_LOAD if bpf_load else 0))
        return {"guarded_inodes": [[dev, ino, flags] for (dev, ino), flags in entries.items()],
                "guarded_ids": {k: sorted(i for kind, i in ids if kind == n)
                                for n, k in ((1, "maps"), (2, "programs"), (3, "links"))}}

    def unprotect(self) -> None:
        """Self-protection off (an authorized stop, a switch to monitor or fail-open)."""
        self._set_protect_flags(0)

    @property
    def protecting(self) -> bool:
        return bool(self._protect_flags & CFG_PROTECT)

    def stats(self) -> LsmStats:
        k = self.counters()
        d = self._decoder.stats
        return LsmStats(k["execs"], k["in_scope"], k["denied"], k["invalidated"], k["drops"],
                        d.decoded, d.short, d.unknown_op, k["maps"], k["maps_denied"],
                        k["loader_denied"], k["mounts_refused"], k["ptrace_refused"],
                        k["epochs"], k["orphan_denied"], k["tamper"])
