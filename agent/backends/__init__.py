"""Enforcement backends behind one interface, each proven by a functional self-test.

A runner wraps a sensor (fanotify permission events, or the BCC exec sensor) and turns
what it sees into Decisions through the shared Decider. ``start_backend`` walks the
preference order from the chosen backend down, and a runner whose self-test fails is
skipped with its reason (ARCHITECTURE.md decision 5). The BPF LSM runner (issue 4) plugs
into the same ``Runner`` protocol.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

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

__all__ = ["CANARIES", "PREFERENCE", "BackendUnavailable", "FanotifyRunner", "FmodRetRunner",
           "LsmRunner", "NotifyAuditRunner", "Runner", "SelftestResult", "SensorRunner",
           "make_runners", "pump", "start_backend"]


def make_runners(name: str, decider: Decider, record: Record) -> List[Runner]:
    """The runners that can serve ``name``, preferred first."""
    if name in ("fanotify-exec", "fanotify-open"):
        return [FanotifyRunner(name, decider, record)]
    if name == "kill":
        return [SensorRunner(name, decider, record)]
    if name == "audit-only":  # the BCC sensor where it loads, else fanotify notifications
        return [SensorRunner(name, decider, record), NotifyAuditRunner(decider, record)]
    if name == "bpf-lsm":
        return [LsmRunner(name, decider, record)]
    if name == "fmod-ret":
        return [FmodRetRunner(name, decider, record)]
    raise BackendUnavailable(f"unknown backend {name}")


def start_backend(first: str, decider: Decider, record: Record,
                  on_skip: Callable[[str, str], None]) -> Tuple[Runner, SelftestResult]:
    """Start ``first`` or, when its self-test fails, the next one down the preference order."""
    for name in PREFERENCE[PREFERENCE.index(first):]:
        try:
            runners = make_runners(name, decider, record)
        except BackendUnavailable as exc:
            on_skip(name, str(exc))
            continue
        for runner in runners:
            result = runner.selftest()
            if not result.ok:
                on_skip(name, result.detail)
                continue
            try:
                runner.start()
            except (OSError, ExecguardError) as exc:
                on_skip(name, f"{name} failed to start: {exc}")
                runner.stop()
                continue
            return runner, result
    raise BackendUnavailable("no backend passed its self-test")
