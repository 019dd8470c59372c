"""fanotify-exec / fanotify-open: the exec waits at open for the agent's answer."""

from __future__ import annotations

import subprocess
import threading
from typing import Any, Dict, Optional, Tuple, Union

from agent.backends.base import (
    Record,
    SelftestResult,
    canary_into,
    drop_tmpfs,
    private_tmpfs,
    replace_decision,
    run_canary,
    with_exe,
)
from agent.decide import Decider
from agent.decision import Decision, Enforcement, ExecEvent, FileIdentity, Source
from agent.errors import ExecguardError, Reason
from agent.policy import Action, Mode, PolicySnapshot
from agent.sensors.fanotify_model import ALLOW_ONCE, AllowOnce
from agent.service.heartbeat import Heartbeat


def answer_for(decision: Decision, enforcement: Enforcement, snapshot: PolicySnapshot
               ) -> Union[bool, AllowOnce]:
    """The open's answer. A would-deny that runs only because its rule is in monitor mode
    (the policy enforces) must not leave an ignore mark: the mark is per inode, so after a
    rename (or a link) into a path that an enforcing rule covers, the file would run
    unjudged and unrecorded. In a monitor policy nothing is blocked anywhere, so the mark
    stays (and a switch to enforce flushes every mark)."""
    if decision.allow:
        return True
    if decision.enforcement is enforcement:
        return False
    return ALLOW_ONCE if snapshot.mode is Mode.ENFORCE else True


class FanotifyRunner:
    """FAN_OPEN_EXEC_PERM (or FAN_OPEN_PERM) on the scoped mounts, with a watchdog process."""

    enforcement = Enforcement.FANOTIFY_DENY

    def __init__(self, name: str, decider: Decider, record: Record) -> None:
        from agent.sensors import fanotify_sys as fs

        self.name = name
        self.mask = fs.FAN_OPEN_EXEC_PERM if name == "fanotify-exec" else fs.FAN_OPEN_PERM
        self.decider = decider
        self.record = record
        self._pending: Dict[int, Tuple[ExecEvent, Decision]] = {}
        self._lock = threading.Lock()
        self._backend: Any = None
        self._watchdog: Any = None
        self._scopes: Tuple[str, ...] = ()
        self._swaps = 0  # policy swaps re-armed

    def selftest(self) -> SelftestResult:
        from agent.sensors.fanotify_backend import FanotifyBackend

        mnt = private_tmpfs()
        verdict = {"allow": False}
        backend = FanotifyBackend([mnt], lambda ev, fd: verdict["allow"], 2.0, True,
                                  exempt_descendants=False, ignore_marks=False, mask=self.mask)
        try:
            canary = canary_into(mnt)
            backend.start()
            denied = run_canary(canary)
            verdict["allow"] = True
            allowed = run_canary(canary)
        except (OSError, subprocess.SubprocessError, ExecguardError) as exc:
            return SelftestResult(False, f"{self.name} self-test failed: {exc}")
        finally:
            backend.stop()
            drop_tmpfs(mnt)
        if denied[0] != "eperm" or allowed != ("ran", 0):
            return SelftestResult(False, f"{self.name} self-test: canary denied -> {denied}, "
                                  f"allowed -> {allowed}")
        return SelftestResult(True, f"{self.name}: canary denied with EPERM, then allowed")

    def start(self) -> None:
        from agent.sensors.fanotify_watchdog import Watchdog

        snapshot = self.decider.store.current.snapshot
        deadline = snapshot.limits.decision_deadline_ms / 1000
        self._watchdog = Watchdog.spawn(stall_s=deadline)
        self._backend = self._make_backend(snapshot)
        self._backend.start()

    def _make_backend(self, snapshot: PolicySnapshot) -> Any:
        from agent.sensors.fanotify_backend import FanotifyBackend

        self._scopes = tuple(snapshot.scope_roots())
        # rules on the caller or on paths: an ignore mark would let other callers, or the
        # file renamed elsewhere, skip them
        self._per_file = snapshot.file_decides
        return FanotifyBackend(
            snapshot.scope_roots(), self._decide, snapshot.limits.decision_deadline_ms / 1000,
            snapshot.effective_on_timeout is Action.ALLOW, [self._watchdog.pid],
            observer=self._observe, heartbeat_fd=self._watchdog.heartbeat_fd, mask=self.mask,
            ignore_marks=self._per_file)

    def _remark(self, snapshot: PolicySnapshot) -> None:
        """Other scopes: a new group marks the new mounts (and holds no ignore mark) before
        the old one goes, so no exec in either scope is left unwatched in between."""
        old, new = self._backend, self._make_backend(snapshot)
        new.start()
        self._backend = new
        old.stop()

    def _decide(self, event: ExecEvent, fd: int) -> Union[bool, AllowOnce]:
        decision = self.decider.decide(with_exe(event), fd, self.enforcement)
        with self._lock:
            self._pending[id(event)] = (event, decision)
        return answer_for(decision, self.enforcement, self.decider.store.current.snapshot)

    def _observe(self, outcome: Any) -> None:
        from agent.sensors.fanotify_backend import Cause

        event = outcome.event
        with self._lock:
            held = self._pending.pop(id(event), None) if event is not None else None
        decision = held[1] if held is not None else None
        if outcome.cause is Cause.DECIDED and decision is not None:
            self.record(decision)
        elif outcome.cause is Cause.LATE and decision is not None:
            self.record(replace_decision(decision, extra={"late": True,
                                                  "applied": "on_timeout answer"}))
        elif outcome.cause is Cause.TIMEOUT and event is not None:
            allow = outcome.allowed
            self.record(Decision(
                event, allow, Reason.DECISION_TIMEOUT,
                f"no decision within the deadline; on_timeout {'allow' if allow else 'deny'}",
                Enforcement.NONE if allow else self.enforcement, Source.DEFAULT,
                policy_version=self.decider.store.current.snapshot.version))
        elif outcome.cause.value in ("changed", "error") and event is not None:
            self.record(Decision(event, False, Reason.VERIFY_FAILED,
                                 outcome.detail or f"denied: {outcome.cause.value}",
                                 self.enforcement, Source.DEFAULT))

    def remember(self, path: str, identity: FileIdentity, allow: bool,
                 decided_under: Optional[PolicySnapshot] = None) -> None:
        """Nothing to do: the fanotify path consults the verdict cache at exec time."""

    def policy_changed(self, snapshot: PolicySnapshot) -> None:
        """A policy hook: files allowed under the old policy are asked again (their ignore
        marks would otherwise let them run past a revocation)."""
        if self._backend is not None:
            if (tuple(snapshot.scope_roots()) != self._scopes
                    or snapshot.file_decides != self._per_file):
                self._remark(snapshot)
            else:
                self._backend.forget_allowed()
            self._swaps += 1

    def alive(self, max_silence_s: float) -> Optional[str]:
        """None while the fanotify loop turns (the service watchdog's proof), else why not."""
        backend = self._backend
        if backend is None:
            return f"{self.name}: not started"
        state = backend.stats().get("state")
        if state != "running":
            return f"{self.name}: fanotify loop {state}"
        beat: Heartbeat = backend.heartbeat
        why = beat.check(max_silence_s)
        if why is not None:
            return why
        # the loop turns even when every decide worker is stuck (each exec then gets the
        # on_timeout answer, forever): execs waiting with no decision finished for longer
        # than the window (or the policy's deadline, when longer) mean a wedged decide path
        deadline = self.decider.store.current.snapshot.limits.decision_deadline_ms / 1000
        stalled = float(backend.stalled_s())
        if stalled > max(max_silence_s, deadline):
            return (f"{self.name}: execs waiting, no decision finished for {stalled:.1f}s "
                    "(decide workers stuck)")
        return None

    def stop(self) -> None:
        if self._backend is not None:
            self._backend.stop()
        if self._watchdog is not None:
            self._watchdog.close()

    def stats(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(self._backend.stats()) if self._backend is not None else {}
        out["policy_swaps"] = self._swaps
        return out
