"""Enforcement backends behind one interface, each proven by a functional self-test.

A runner wraps a sensor (fanotify permission events, or the BCC exec sensor) and turns
what it sees into Decisions through the shared Decider. ``start_backend`` walks the
preference order from the chosen backend down, and a runner whose self-test fails is
skipped with its reason (docs/architecture.md decision 5). The BPF LSM runner (issue 4) plugs
into the same ``Runner`` protocol.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

from agent import registry
from agent.backends.base import (
    CANARIES,
    PREFERENCE,
    BackendUnavailable,
    Record,
    Runner,
    SelftestResult,
    pump,
)
from agent.backends.fanotify import FanotifyRunner
from agent.backends.lsm import FmodRetRunner, LsmRunner
from agent.backends.notify import NotifyAuditRunner
from agent.backends.sensor import SensorRunner
from agent.decide import Decider
from agent.errors import ExecguardError

__all__ = [
    "CANARIES",
    "PREFERENCE",
    "RUNNERS",
    "BackendUnavailable",
    "FanotifyRunner",
    "FmodRetRunner",
    "LsmRunner",
    "NotifyAuditRunner",
    "Runner",
    "SelftestResult",
    "SensorRunner",
    "make_runners",
    "pump",
    "start_backend",
]


RunnerFactory = Callable[[str, Decider, Record], List[Runner]]

# The runners behind each backend of agent/registry.py, preferred first.
RUNNERS: Dict[str, RunnerFactory] = {
    "bpf-lsm": lambda name, decider, record: [LsmRunner(name, decider, record)],
    "fmod-ret": lambda name, decider, record: [FmodRetRunner(name, decider, record)],
    "fanotify-exec": lambda name, decider, record: [FanotifyRunner(name, decider, record)],
    "fanotify-open": lambda name, decider, record: [FanotifyRunner(name, decider, record)],
    "kill": lambda name, decider, record: [SensorRunner(name, decider, record)],
    # the BCC sensor where it loads, else fanotify notifications
    "audit-only": lambda name, decider, record: [SensorRunner(name, decider, record),
                                                 NotifyAuditRunner(decider, record)],
}


def make_runners(name: str, decider: Decider, record: Record) -> List[Runner]:
    """The runners that can serve ``name``, preferred first."""
    factory = RUNNERS.get(name)
    if factory is None:
        raise BackendUnavailable(f"unknown backend {name}")
    return factory(name, decider, record)


def start_backend(first: str, decider: Decider, record: Record,
                  on_skip: Callable[[str, str], None], only: bool = False
                  ) -> Tuple[Runner, SelftestResult]:
    """Start ``first`` or, when its self-test fails, the next one down the preference order;
    with ``only`` (a backend the operator named), ``first`` or nothing."""
    reasons: List[str] = []

    def skip(name: str, why: str) -> None:
        reasons.append(why)
        on_skip(name, why)

    for name in (first,) if only else registry.below(first):
        try:
            runners = make_runners(name, decider, record)
        except BackendUnavailable as exc:
            skip(name, str(exc))
            continue
        for runner in runners:
            result = runner.selftest()
            if not result.ok:
                skip(name, result.detail)
                continue
            try:
                runner.start()
            except (OSError, ExecguardError) as exc:
                skip(name, f"{name} failed to start: {exc}")
                runner.stop()
                continue
            return runner, result
    if only:
        raise BackendUnavailable(f"--backend {first} cannot start here: {'; '.join(reasons)}\n"
                                 "  nothing was enforced: run 'execguard doctor --backend "
                                 f"{first}' for the probes, or use '--backend auto' for the "
                                 "best backend this host passes")
    raise BackendUnavailable("no backend passed its self-test")
