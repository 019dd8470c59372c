"""The BCC exec sensor, kernel verdict map and kill backend (bpf/exec_sensor.c).

The seam to BCC for the agent process: every BCC failure becomes ``SensorUnavailable``.
Knobs reach the C text only as ``-D`` cflags built from validated ints; runtime switches
(kill, deny-unknown) and the scope live in maps, so they change without a recompile.

Typical use by the daemon::

    with BpfExecSensor() as sensor:
        result = run_selftest(sensor)          # agent.sensors.selftest; must pass first
        sensor.add_scope_dev(os.stat(scope_dir).st_dev)
        sensor.set_mode(kill=True, deny_unknown=False)
        while running:
            for rec in sensor.poll(timeout_ms=100):
                ...decide; sensor.set_verdict(rec.event.identity, allow)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Set, Tuple

from agent.decision import FileIdentity
from agent.sensors.decode import ExecRecord, RecordDecoder, st_dev_to_kernel_dev
from agent.sensors.errors import SensorMapError, SensorUnavailable
from agent.sensors.kernel_layout import Btf, LayoutError, exec_sensor_offsets

BACKEND = "kill"
BPF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "bpf")
SOURCE = "exec_sensor.c"

VERDICT_ALLOW, VERDICT_DENY = 1, 2  # EG_VERDICT_* in bpf/events.h
CFG_KILL, CFG_DENY_UNKNOWN = 0x01, 0x02  # EG_CFG_*
STAT_NAMES = ("execs", "drops", "kills", "kill_failed", "read_errors")  # EG_STAT_* order


@dataclass(frozen=True)
class SensorConfig:
    """Compile-time knobs of the exec sensor (validated before they reach the C text)."""

    ringbuf_pages: int = 64  # ring buffer size in pages (power of two): 256 KiB by default
    verdict_max: int = 65536  # entries in the kernel verdict map
    scope_max: int = 64  # devices that can be in scope

    def cflags(self) -> List[str]:
        pages = self.ringbuf_pages
        if pages < 1 or pages > 1 << 16 or pages & (pages - 1):
            raise ValueError(f"ringbuf_pages must be a power of two in 1..65536, not {pages}")
        for name, v in (("verdict_max", self.verdict_max), ("scope_max", self.scope_max)):
            if not 1 <= int(v) <= 1 << 24:
                raise ValueError(f"{name} must be in 1..16777216, not {v}")
        return [
            f"-DEG_RINGBUF_PAGES={int(pages)}",
            f"-DEG_VERDICT_MAX={int(self.verdict_max)}",
            f"-DEG_SCOPE_MAX={int(self.scope_max)}",
        ]


@dataclass(frozen=True)
class SensorStats:
    """Kernel counters (summed over CPUs) and the decoder's counters."""

    execs: int  # sched_process_exec runs seen by the program
    drops: int  # ring buffer full: event lost (the kill decision still ran)
    kills: int
    kill_failed: int
    read_errors: int  # a kernel read failed; such events carry no trustworthy identity
    decoded: int
    short_records: int
    unknown_records: int


def build_cflags(
    config: SensorConfig,
    btf_path: Optional[str] = None,
    offsets: Optional[Dict[str, int]] = None,
) -> List[str]:
    """All cflags: include dir, knobs, and this kernel's struct offsets from BTF.

    ``offsets`` replaces the BTF lookup (a kernel without BTF whose layout the operator
    knows, or a test that proves the self-test catches a wrong one).
    """
    if offsets is None:
        try:
            offsets = exec_sensor_offsets(Btf.load(btf_path) if btf_path else Btf.load())
        except LayoutError as exc:
            raise SensorUnavailable(
                BACKEND,
                f"cannot read struct offsets: {exc}",
                "the exec sensor needs kernel BTF (CONFIG_DEBUG_INFO_BTF=y)",
            ) from exc
    flags = [f"-I{BPF_DIR}", *config.cflags()]
    flags += [f"-D{k}={int(v)}" for k, v in sorted(offsets.items())]
    return flags


def print_bpf(config: SensorConfig = SensorConfig()) -> str:
    """The program text and cflags BCC would compile (for ``execguard doctor --print-bpf``)."""
    with open(os.path.join(BPF_DIR, SOURCE), encoding="utf-8") as f:
        text = f.read()
    return f"// cflags: {' '.join(build_cflags(config))}\n{text}"


@contextlib.contextmanager
def _captured_stderr() -> Iterator[List[str]]:
    """libbcc writes compiler and verifier messages to fd 2: keep them for the error."""
    out: List[str] = []
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            out.extend(log.read()[-8000:].decode("utf-8", "replace").splitlines())


def _explain(exc: Exception, log: List[str]) -> Tuple[str, Optional[str]]:
    from agent.sensors.bcc_probe import probe_headers

    lines = [ln.strip() for ln in log if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln][:3]  # the first compiler errors explain most
    text = " | ".join(errors or lines)
    if "kconfig.h" in text or "Unable to find kernel headers" in text:
        return "BCC cannot compile: no kernel headers", probe_headers(os.uname().release).hint
    if "Operation not permitted" in text or isinstance(exc, PermissionError):
        return f"{exc}: {text[-300:]}", "run as root with CAP_BPF and CAP_PERFMON/CAP_SYS_ADMIN"
    return f"{exc}: {text[-400:]}" if text else str(exc), "run execguard doctor"


def _header_warnings() -> Tuple[str, ...]:
    """Say loudly when BCC compiles against another kernel's headers (our 6.18 dev VM)."""
    from agent.sensors.bcc_probe import probe_headers

    res = probe_headers(os.uname().release)
    if res.ok:
        return ()
    return (
        f"{res.detail}. The exec sensor reads struct fields at offsets from this kernel's "
        "BTF, not from those headers; the identity self-test checks the result.",
    )


class BpfExecSensor:
    """Loaded and attached on construction; detached by ``close()`` (or the ``with`` exit)."""

    backend = BACKEND

    def __init__(
        self, config: SensorConfig = SensorConfig(), offsets: Optional[Dict[str, int]] = None
    ) -> None:
        self.config = config
        self.cflags = build_cflags(config, offsets=offsets)
        self._records: List[ExecRecord] = []
        self._scope_devs: Set[int] = set()
        self._decoder = RecordDecoder(self._realtime_offset(), backend=BACKEND)
        try:
            import bcc
        except ImportError as exc:
            raise SensorUnavailable(
                BACKEND, f"import bcc failed: {exc}", "install python3-bpfcc (scripts/setup.sh)"
            ) from exc
        self._bcc: Any = bcc
        self.warnings = _header_warnings()
        log: List[str] = []
        try:
            with _captured_stderr() as log:
                self._bpf: Any = bcc.BPF(src_file=os.path.join(BPF_DIR, SOURCE), cflags=self.cflags)
        except Exception as exc:  # BCC raises bare Exception for everything
            cause, hint = _explain(exc, log)
            raise SensorUnavailable(BACKEND, cause, hint) from exc
        try:
            self._bpf[b"events"].open_ring_buffer(self._on_ring)
            self._verdicts = self._bpf[b"verdicts"]
            self._scope = self._bpf[b"scope_devs"]
            self._config = self._bpf[b"config"]
            self._stats = self._bpf[b"stats"]
            self.set_mode(kill=False, deny_unknown=False)
        except Exception as exc:
            self.close()
            raise SensorUnavailable(BACKEND, f"ring buffer or maps: {exc}") from exc

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Detach the program and free its maps: the kernel then kills nothing (fail-open)."""
        bpf = getattr(self, "_bpf", None)
        if bpf is not None:
            self._bpf = None
            bpf.cleanup()

    def __enter__(self) -> BpfExecSensor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ events

    @staticmethod
    def _realtime_offset() -> int:
        return time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(
            time.CLOCK_BOOTTIME
        )

    def _on_ring(self, _ctx: Any, data: Any, size: int) -> int:
        try:
            rec = self._decoder.decode(ctypes.string_at(data, size))
        except Exception:  # the decoder counts bad records; this guards the C callback
            self._decoder.stats.short += 1
            return 0
        if rec is not None:
            self._records.append(rec)
        return 0

    def poll(self, timeout_ms: int) -> List[ExecRecord]:
        """Wait up to ``timeout_ms`` for a wake-up, then drain every record.

        Cache hits are submitted without a wake-up (BPF_RB_NO_WAKEUP), so the drain after the
        wait is what delivers them: call this at least every ~100 ms.
        """
        if self._bpf is None:
            raise SensorUnavailable(BACKEND, "sensor is closed")
        self._decoder.realtime_offset_ns = self._realtime_offset()
        self._bpf.ring_buffer_poll(int(timeout_ms))
        self._bpf.ring_buffer_consume()
        out, self._records = self._records, []
        return out

    # ------------------------------------------------------------ verdict map and scope

    @contextlib.contextmanager
    def _map_op(self, operation: str) -> Iterator[None]:
        """BCC raises bare Exceptions for map updates (E2BIG when full, EBADF when closed)."""
        if self._bpf is None:
            raise SensorMapError(BACKEND, operation, "sensor is closed")
        try:
            yield
        except KeyError:
            raise
        except Exception as exc:
            raise SensorMapError(BACKEND, operation, str(exc)) from exc

    def _key(self, identity: FileIdentity) -> Any:
        return self._verdicts.Key(ino=identity.ino, dev=st_dev_to_kernel_dev(identity.dev))

    def set_verdict(self, identity: FileIdentity, allow: bool) -> None:
        """Record a verdict for this exact file version (dev, ino, ctime, size)."""
        leaf = self._verdicts.Leaf(
            ctime_ns=identity.ctime_ns,
            size=identity.size,
            verdict=VERDICT_ALLOW if allow else VERDICT_DENY,
        )
        with self._map_op("set_verdict"):
            self._verdicts[self._key(identity)] = leaf

    def forget(self, identity: FileIdentity) -> None:
        """Drop the verdict for (dev, ino); a missing entry is not an error."""
        with self._map_op("forget"), contextlib.suppress(KeyError):
            del self._verdicts[self._key(identity)]

    def clear_verdicts(self) -> int:
        """Drop every verdict (a policy reload: none decided under the old policy stands)."""
        dropped = 0
        with self._map_op("clear_verdicts"):
            for key in list(self._verdicts.keys()):
                with contextlib.suppress(KeyError):
                    del self._verdicts[key]
                    dropped += 1
        return dropped

    def add_scope_dev(self, st_dev: int) -> None:
        """Enforce on every file of this filesystem (``stat().st_dev``). A whole-device scope:
        only add devices whose every executable is in the policy's scope.
        """
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
        """The ``st_dev`` values in scope."""
        return frozenset(self._scope_devs)

    def set_mode(self, *, kill: bool, deny_unknown: bool) -> None:
        """kill: SIGKILL denied execs in scope. deny_unknown: unknown files in scope are denied."""
        flags = (CFG_KILL if kill else 0) | (CFG_DENY_UNKNOWN if deny_unknown else 0)
        with self._map_op("set_mode"):
            self._config[ctypes.c_int(0)] = self._config.Leaf(flags=flags)
        self._mode = (kill, deny_unknown)

    @property
    def mode(self) -> Tuple[bool, bool]:
        """(kill, deny_unknown) as last set."""
        return self._mode

    def stats(self) -> SensorStats:
        k = {n: int(self._stats.sum(ctypes.c_int(i)).value) for i, n in enumerate(STAT_NAMES)}
        d = self._decoder.stats
        return SensorStats(
            execs=k["execs"],
            drops=k["drops"],
            kills=k["kills"],
            kill_failed=k["kill_failed"],
            read_errors=k["read_errors"],
            decoded=d.decoded,
            short_records=d.short,
            unknown_records=d.unknown_op,
        )
