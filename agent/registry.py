"""The enforcement backends, best first: one table for doctor's choice (which probes each
needs, agent/sensors/probe.py) and for the agent's start-up order and downgrade chain
(agent/backends, ``start_backend``). A backend added here and nowhere else fails the test
that every name has a runner (tests/unit/test_registry.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

AUDIT_ONLY = "audit-only"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    needs: Tuple[str, ...]  # probes that must all pass (agent/sensors/probe.py)
    what: str  # how it blocks, as doctor says it


BACKENDS: Tuple[BackendSpec, ...] = (
    BackendSpec("bpf-lsm", ("btf", "bpf-programs", "lsm", "bpf-lsm"),
                "LSM hook on bprm_check_security denies with EPERM"),
    BackendSpec("fmod-ret", ("btf", "bpf-programs", "fmod-ret"),
                "fmod_ret on security_bprm_check denies with EPERM (a tracing program: needs "
                "no bpf in lsm=)"),
    BackendSpec("fanotify-exec", ("fanotify-exec",),
                "FAN_OPEN_EXEC_PERM answers each exec synchronously"),
    BackendSpec("fanotify-open", ("fanotify-open",),
                "FAN_OPEN_PERM: exec cannot be told from read, so plain opens of unsigned Go "
                "binaries are denied too"),
    BackendSpec("kill", ("btf", "bpf-programs", "send-signal"),
                "sched_process_exec + bpf_send_signal(SIGKILL) after exec, and at mmap(PROT_EXEC)"),
    BackendSpec(AUDIT_ONLY, (), "records would-deny decisions and blocks nothing"),
)
NAMES: Tuple[str, ...] = tuple(b.name for b in BACKENDS)
BY_NAME: Dict[str, BackendSpec] = {b.name: b for b in BACKENDS}


def below(name: str) -> Tuple[str, ...]:
    """``name`` and every backend after it: the downgrade chain from ``name``."""
    return NAMES[NAMES.index(name):]
