"""audit-only without BCC: fanotify notification events, which never block."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any, Dict, List, Optional, Tuple

from agent.backends.base import (
    Record,
    SelftestResult,
    canary_into,
    drop_tmpfs,
    private_tmpfs,
    run_canary,
)
from agent.decide import Decider
from agent.decision import Enforcement, ExecEvent, FileIdentity
from agent.errors import ExecguardError
from agent.policy import PolicySnapshot
from agent.service.heartbeat import Heartbeat


class NotifyAuditRunner:
    """audit-only without BCC: fanotify notification events, which never block an exec. For
    kernels where the exec sensor cannot load (no BTF, CentOS 7, lockdown=confidentiality)."""

    name = "audit-only"
    enforcement = Enforcement.AUDIT_ONLY

    def __init__(self, decider: Decider, record: Record) -> None:
        self.decider = decider
        self.record = record
        self._notifier: Any = None
        self._scopes: Tuple[str, ...] = ()

    def selftest(self) -> SelftestResult:
        from agent.sensors.fanotify_notify import ExecNotifier

        mnt = private_tmpfs()
        seen: List[ExecEvent] = []
        notifier = ExecNotifier([mnt], lambda ev, fd: seen.append(ev))
        try:
            canary = canary_into(mnt)
            notifier.start()
            ran = run_canary(canary)
            deadline = time.monotonic() + 5
            while not seen and time.monotonic() < deadline:
                time.sleep(0.02)
            st = os.stat(canary)
        except (OSError, subprocess.SubprocessError, ExecguardError) as exc:
            return SelftestResult(False, f"audit-only (fanotify) self-test failed: {exc}")
        finally:
            notifier.stop()
            drop_tmpfs(mnt)
        if ran != ("ran", 0) or not seen or \
                (seen[0].identity.dev, seen[0].identity.ino) != (st.st_dev, st.st_ino):
            return SelftestResult(False, f"audit-only (fanotify): canary {ran}, "
                                  f"{len(seen)} event(s) seen")
        return SelftestResult(True, f"audit-only via fanotify {notifier.name} notifications: "
                              "canary exec seen with its identity")

    def start(self) -> None:
        from agent.sensors.fanotify_notify import ExecNotifier

        snapshot = self.decider.store.current.snapshot
        self._scopes = tuple(snapshot.scope_roots())
        self._notifier = ExecNotifier(snapshot.scope_roots(), self._on_exec)
        self._notifier.start()

    def _on_exec(self, event: ExecEvent, fd: int) -> None:
        self.record(self.decider.decide(event, fd, self.enforcement))

    def remember(self, path: str, identity: FileIdentity, allow: bool,
                 decided_under: Optional[PolicySnapshot] = None) -> None:
        """Nothing to do: audit-only consults the verdict cache at each exec."""

    def policy_changed(self, snapshot: PolicySnapshot) -> None:
        """Each exec is decided under the current policy already; other scopes need other
        marks: the new notifier starts before the old one stops."""
        from agent.sensors.fanotify_notify import ExecNotifier

        old = self._notifier
        if old is None or tuple(snapshot.scope_roots()) == self._scopes:
            return
        new = ExecNotifier(snapshot.scope_roots(), self._on_exec)
        new.start()
        self._notifier, self._scopes = new, tuple(snapshot.scope_roots())
        old.stop()

    def alive(self, max_silence_s: float) -> Optional[str]:
        """None while the notification loop turns (the service watchdog's proof)."""
        if self._notifier is None:
            return "audit-only (fanotify): not started"
        beat: Heartbeat = self._notifier.heartbeat
        return beat.check(max_silence_s)

    def stop(self) -> None:
        if self._notifier is not None:
            self._notifier.stop()

    def stats(self) -> Dict[str, Any]:
        return dict(self._notifier.stats()) if self._notifier is not None else {}
