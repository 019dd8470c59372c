"""The kill backend's sensor (exec_sensor.c): SIGKILL before a denied program or
PROT_EXEC mapping runs, on hosts that allow only tracepoints and ``bpf_send_signal``.

It places and judges files with exec_verdict.h, like the BPF LSM backends (same maps,
same scope semantics: ``KernelScope`` writes them), reading kernel fields with
``bpf_probe_read_kernel`` at offsets from this kernel's BTF. Every BCC failure becomes
``SensorUnavailable``.

Typical use (the runner is ``agent.backends.SensorRunner``)::

    with BpfExecSensor() as sensor:
        result = run_selftest(sensor)          # agent.sensors.selftest; must pass first
        scope = KernelScope(sensor, snapshot); scope.start()
        sensor.set_mode(enforce=True, deny_unknown=True)
        for rec in sensor.poll(timeout_ms=100):
            ...decide; sensor.set_verdict(rec.event.identity, allow)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from agent.sensors.bpf.build import (
    BPF_DIR,
    LOAD_PROBE_READ,
    SensorConfig,
    lockdown_level,
    program_text,
)
from agent.sensors.bpf.build import build_cflags as _build_cflags
from agent.sensors.bpf.sensor import BpfSensor, Guards
from agent.sensors.bpf_lsm import verdict_offsets
from agent.sensors.errors import SensorUnavailable
from agent.sensors.kernel_layout import VMLINUX_BTF, Btf

__all__ = ["BACKEND", "BPF_DIR", "BpfExecSensor", "SensorConfig", "SensorStats",
           "build_cflags", "kill_offsets", "print_bpf"]

BACKEND = "kill"
SOURCE = "exec_sensor.c"
# kill_stats[] of exec_sensor.c (EG_KILL_STAT_*), in index order
KILL_STAT_NAMES = ("kills", "kill_failed", "read_errors", "mmap_calls", "shm_exec")
TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
MAPPING_TRACEPOINTS = ("sys_enter_mmap", "sys_enter_shmat")
DEFAULT_CONFIG = SensorConfig()
BTF_HINT = "the kill backend needs kernel BTF (CONFIG_DEBUG_INFO_BTF=y)"


@dataclass(frozen=True)
class SensorStats:
    """Kernel counters (summed over CPUs) and the decoder's counters."""

    execs: int  # sched_process_exec runs (every exec on the host)
    drops: int  # ring buffer full: record lost (the kill decision still ran)
    kills: int  # bpf_send_signal(SIGKILL) succeeded (execs and mappings)
    kill_failed: int
    read_errors: int  # an exec whose file could not be read: judged as unknown
    decoded: int
    short_records: int
    unknown_records: int
    in_scope: int = 0  # execs in scope (or of a loader), reported
    maps: int = 0  # PROT_EXEC mappings of files in scope judged
    maps_killed: int = 0
    loader_killed: int = 0  # dynamic loaders run as a program
    mmap_calls: int = 0  # PROT_EXEC mmap calls of a file (any filesystem)
    shm_exec: int = 0  # shmat(SHM_EXEC) calls


def kill_offsets(btf: Btf, blob: bytes) -> Dict[str, int]:
    """The ``EG_*`` macros exec_sensor.c needs: exec_verdict.h's, plus the exec's
    name, the descriptor table (the file behind an mmap's fd) and dentry names (a mapping's
    path for its record)."""
    out = verdict_offsets(btf, blob, "security_inode_setattr")  # the header parses its hooks
    out["EG_OFF_BPRM_FILENAME"] = btf.require("linux_binprm", "filename", 8).offset
    out["EG_OFF_TASK_FILES"] = btf.require("task_struct", "files", 8).offset
    out["EG_OFF_FILES_FDT"] = btf.require("files_struct", "fdt", 8).offset
    out["EG_OFF_FDT_MAX_FDS"] = btf.require("fdtable", "max_fds", 4).offset
    out["EG_OFF_FDT_FD"] = btf.require("fdtable", "fd", 8).offset
    out["EG_OFF_DENTRY_NAME"] = btf.require("dentry", "d_name").offset
    out["EG_OFF_QSTR_NAME"] = btf.require("qstr", "name", 8).offset
    return out


def build_cflags(config: SensorConfig = DEFAULT_CONFIG, btf_path: Optional[str] = None,
                 offsets: Optional[Dict[str, int]] = None) -> List[str]:
    """All cflags: include dir, knobs, and this kernel's struct offsets from BTF."""
    return _build_cflags(config, BACKEND, kill_offsets, btf_path=btf_path or VMLINUX_BTF,
                         offsets=offsets, btf_hint=BTF_HINT)


def print_bpf(config: SensorConfig = DEFAULT_CONFIG) -> str:
    """The program text and cflags BCC would compile (for ``execguard doctor --print-bpf``)."""
    return (f"// cflags: {' '.join(build_cflags(config))}\n"
            f"{program_text(SOURCE, BACKEND, LOAD_PROBE_READ)}")


def mapping_tracepoints() -> Tuple[bool, str]:
    """Can the mapping hooks attach: (yes, "") or (no, why). They are syscall tracepoints
    (CONFIG_FTRACE_SYSCALLS), which BCC finds through tracefs."""
    for root in TRACEFS:
        events = os.path.join(root, "events", "syscalls")
        if os.path.isdir(events):
            missing = [t for t in MAPPING_TRACEPOINTS
                       if not os.path.exists(os.path.join(events, t, "id"))]
            if missing:
                return False, f"{events} lacks {', '.join(missing)}"
            return True, ""
    return False, ("no syscall tracepoints under " + " or ".join(TRACEFS) +
                   " (tracefs not mounted, or a kernel without CONFIG_FTRACE_SYSCALLS)")


class BpfExecSensor(BpfSensor):
    """The kill sensor. Until it is configured it kills nothing: every knob is off, and the
    guards say that filesystems without a class are out of scope (``KernelScope`` writes the
    policy's guards when the runner starts)."""

    backend = BACKEND
    source = SOURCE
    offsets_fn = staticmethod(kill_offsets)  # type: ignore[assignment]
    load = LOAD_PROBE_READ
    initial_guards = Guards(unseen_out=True)
    btf_hint = BTF_HINT

    def __init__(self, config: Optional[SensorConfig] = None,
                 offsets: Optional[Dict[str, int]] = None) -> None:
        self.mappings, why = mapping_tracepoints()
        super().__init__(config, offsets)
        if not self.mappings:
            self.warnings += (f"PROT_EXEC mappings are not judged: {why}",)

    def _check_host(self) -> None:
        if lockdown_level() == "confidentiality":
            raise SensorUnavailable(
                BACKEND, "lockdown=confidentiality forbids bpf_probe_read_kernel, which the "
                "kill backend reads kernel structs with", "use bpf-lsm or fmod-ret (BTF "
                "direct loads), or fanotify-exec")

    def _open_maps(self) -> None:
        self._kill_stats = self._bpf[b"kill_stats"]

    def _extra_cflags(self) -> List[str]:
        return [] if self.mappings else ["-DEG_NO_MAPPING_HOOKS=1"]

    def stats(self) -> SensorStats:
        k = self.counters()
        kk = self.counters(b"kill_stats", KILL_STAT_NAMES)
        d = self._decoder.stats
        return SensorStats(
            execs=k["execs"], drops=k["drops"], kills=kk["kills"],
            kill_failed=kk["kill_failed"], read_errors=kk["read_errors"], decoded=d.decoded,
            short_records=d.short, unknown_records=d.unknown_op, in_scope=k["in_scope"],
            maps=k["maps"], maps_killed=k["maps_denied"], loader_killed=k["loader_denied"],
            mmap_calls=kk["mmap_calls"], shm_exec=kk["shm_exec"])
