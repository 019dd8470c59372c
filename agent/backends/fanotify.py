"""fanotify-exec / fanotify-open: the exec waits at open for the agent's answer."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
import time
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple, Union

from agent.backends.base import (
    Record,
    SelftestResult,
    canary_into,
    drop_tmpfs,
    identity_of,
    private_tmpfs,
    replace_decision,
    run_canary,
    with_exe,
)
from agent.backends.fanotify_memo import (
    AllowMemo,
    Remembered,
    may_remember,
    runs_means_allows,
)
from agent.decide import SETTLE_NS, Decider
from agent.decision import Decision, Enforcement, ExecEvent, FileIdentity, Source
from agent.errors import ExecguardError, Reason
from agent.policy import Action, Mode, PolicySnapshot
from agent.scope.live import judged_in_scope
from agent.sensors.fanotify_fuse import say_cut
from agent.sensors.fanotify_marks import STAMPED
from agent.sensors.fanotify_model import ALLOW_ONCE, AllowOnce
from agent.sensors.fanotify_writes import Count, WriteOpens
from agent.service.heartbeat import Heartbeat
from agent.writers import has_writers, ignore_lease_signals

HELD_MAX = 8192  # decisions waiting for their outcome (an observer backlog drops some)
GUARD_POLL_S = 1.0  # the write guard's thread wakes at least this often (FanotifyBackend)


def answer_for(decision: Decision, enforcement: Enforcement, snapshot: PolicySnapshot
               ) -> Union[bool, AllowOnce]:
    """The open's answer. A would-deny that runs only because its rule is in monitor mode
    (the policy enforces) must not be remembered for the file: a remembered allow holds for
    the inode wherever it is, so after a rename (or a link) into a path that an enforcing
    rule covers, the file would run unjudged and unrecorded. In a monitor policy nothing is
    blocked anywhere, so the allow may stand (a switch to enforce starts a new memo)."""
    if decision.allow:
        return True
    if decision.enforcement is enforcement:
        return False
    return ALLOW_ONCE if snapshot.mode is Mode.ENFORCE else True


class FanotifyRunner:
    """FAN_OPEN_EXEC_PERM (or FAN_OPEN_PERM) on the filesystems in scope, with a watchdog
    process. Every exec in scope is answered by the agent, known allows by the loop from the
    memo, except on write-guarded filesystems (tmpfs), where an allowed file carries an
    ignore mark that every write-open removes first (the kernel keeps one through writes
    into a shared mapping: nowhere else would it be safe).

    A verdict is kept (memo) or taken from the trusted cache only where something proves it
    still covers the file's bytes (``FanotifyBackend.write_proof``): a stamp that every
    write changes (ext4, xfs, btrfs, f2fs), or a filesystem whose write-opens the loop sees
    before they are answered (then the memo forgets the inode, and a decision reads the
    bytes itself, never a cached allow). Elsewhere every exec is decided from its bytes."""

    # an allowed file may carry an ignore mark (where write_proof allows one at all)
    IGNORE_MARKS = True

    enforcement = Enforcement.FANOTIFY_DENY

    def __init__(self, name: str, decider: Decider, record: Record) -> None:
        from agent.sensors import fanotify_sys as fs

        self.name = name
        self.mask = fs.FAN_OPEN_EXEC_PERM if name == "fanotify-exec" else fs.FAN_OPEN_PERM
        self.decider = decider
        self.record = record
        self._pending: OrderedDict[int, Tuple[ExecEvent, Decision]] = OrderedDict()
        self._lock = threading.Lock()
        self._backend: Any = None
        self._watchdog: Any = None
        self._scopes: Tuple[str, ...] = ()
        self._swaps = 0  # policy swaps re-armed
        self._memo: Optional[AllowMemo] = None  # allows the loop may answer from memory
        # memo hits answered on the loop, by id(event), until the observer records them;
        # plain dict operations only: the loop never takes a lock a worker holds
        self._hits: Dict[int, Remembered] = {}
        self._memo_hits = 0  # execs answered from the memo (the first of each recorded)
        # decides pre-warmed files for the memo: same policy store and cache, own counters
        # (not exec decisions: status and metrics never see them)
        self._warm_decider = Decider(decider.store, decider.cache)

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

        ignore_lease_signals()  # on the main thread, before any worker asks has_writers()
        snapshot = self.decider.store.current.snapshot
        deadline = snapshot.limits.decision_deadline_ms / 1000
        self._watchdog = Watchdog.spawn(stall_s=deadline)
        self._backend = self._make_backend(snapshot)
        self._backend.start()

    def _make_backend(self, snapshot: PolicySnapshot) -> Any:
        from agent.sensors.fanotify_backend import FanotifyBackend

        self._scopes = tuple(snapshot.scope_roots())
        # rules on the caller or on paths: an answer given for one exec (a memo entry, an
        # ignore mark) must not stand for another caller's exec of the same file, nor for
        # the file renamed elsewhere
        self._per_file = snapshot.file_decides
        self._memo = AllowMemo(snapshot)
        return FanotifyBackend(
            snapshot.scope_roots(), self._decide, snapshot.limits.decision_deadline_ms / 1000,
            snapshot.effective_on_timeout is Action.ALLOW, [self._watchdog.pid],
            observer=self._observe, lookup=self._lookup,
            heartbeat_fd=self._watchdog.heartbeat_fd, mask=self.mask,
            ignore_marks=self._per_file and self.IGNORE_MARKS, share_answers=self._per_file,
            overload_allow=snapshot.mode is Mode.MONITOR,
            on_write_open=self._forget, on_guard_lost=self._forget_all,
            on_fuse_cut=say_cut)

    def _remark(self, snapshot: PolicySnapshot) -> None:
        """Other scopes: a new group marks the new filesystems (and holds no ignore mark)
        before the old one goes, so no exec in either scope is left unwatched in between."""
        old, new = self._backend, self._make_backend(snapshot)
        new.start()
        self._backend = new
        old.stop()

    def _decide(self, event: ExecEvent, fd: int) -> Union[bool, AllowOnce]:
        memo = self._memo
        read_at = time.time_ns()  # the bytes decided are read from here on
        placed, in_scope, proof = self._placed(event, fd)
        decision, seen = self._judge(placed, fd, in_scope, proof, self.decider)
        with self._lock:
            self._pending[id(event)] = (event, decision)
            while len(self._pending) > HELD_MAX:  # outcomes the observer never got
                self._pending.popitem(last=False)
        answer = answer_for(decision, self.enforcement, self.decider.store.current.snapshot)
        if answer is True and memo is not None and proof is not None:
            self._remember_decided(memo, event, fd, decision, read_at, seen)
        return answer

    def _judge(self, event: ExecEvent, fd: int, in_scope: Optional[bool],
               proof: Optional[str], decider: Decider) -> Tuple[Decision, Optional[Count]]:
        """Decide; where no stamp proves a cached allow current, from the bytes themselves.
        A write-open seen while the file was decided means the bytes that run may not be
        the ones read: decided again, and denied when it happens twice. Returns the
        decision and the inode's write-open count it was made under."""
        writes, key = self._writes(), (event.identity.dev, event.identity.ino)
        decision: Optional[Decision] = None
        for _attempt in range(2):
            seen = writes.count(*key) if writes is not None else None
            if proof != STAMPED:
                self._drop_trusted(decider, event.identity)
            decision = decider.decide(with_exe(event), fd, self.enforcement, in_scope=in_scope)
            if seen is None or not decision.allow or writes is None \
                    or writes.count(*key) == seen:
                return decision, seen
        assert decision is not None
        monitor = self.decider.store.current.snapshot.mode is Mode.MONITOR
        return replace_decision(
            decision, allow=monitor, reason=Reason.OPEN_FOR_WRITE,
            enforcement=Enforcement.MONITOR if monitor else self.enforcement,
            detail="opened for write while it was verified, twice: the bytes that would "
            "run may not be the ones verified"), None

    def _writes(self) -> Optional[WriteOpens]:
        backend = self._backend
        return backend.write_opens if backend is not None else None

    @staticmethod
    def _drop_trusted(decider: Decider, identity: FileIdentity) -> None:
        """A trusted verdict the cache holds for this stamp may be older than bytes written
        through a mapping (no new stamp): it goes, so the decision hashes the file. A
        denial stays (the decider still looks for a signature that appeared since)."""
        entry = decider.cache.lookup(identity)
        if entry is not None and entry.verdict.trusted:
            decider.cache.discard(identity)

    def _forget(self, dev: int, ino: int) -> None:
        """On the fanotify loop, before a write-open of the inode is answered."""
        memo = self._memo
        if memo is not None:
            memo.forget(dev, ino)

    def _forget_all(self) -> None:
        """The write guard is gone or missed an open: no remembered allow stands."""
        memo = self._memo
        if memo is not None:
            self._memo = AllowMemo(memo.snapshot)

    def _placed(self, event: ExecEvent, fd: int
                ) -> Tuple[ExecEvent, Optional[bool], Optional[str]]:
        """On the worker: the event under the file's canonical path, whether the policy
        must judge it (agent/scope: a file reached through a mount no table of ours names,
        or without a name, is in scope whatever its path says), and what proves a verdict
        keyed by its stamp current (STAMPED, GUARDED or None: nothing). The loop placed it
        already to answer out-of-scope files at once; this is the same placement, for the
        decider. Before the backend exists: by its path, STAMPED."""
        backend = self._backend
        if backend is None:
            return event, None, STAMPED
        try:
            place = backend.tracker.place_fd(fd, os.readlink(f"/proc/self/fd/{fd}"),
                                             event.pid or None)
        except OSError:
            return event, True, None
        # the mount's own filesystem: an overlay is judged by its guard, not its layer's
        proof = backend.write_proof(place.dev) if place.fs_path is not None else None
        placed = dataclasses.replace(
            event, path=place.path, rules_path=None if place.trusted else place.judged_path)
        return placed, judged_in_scope(place, self.decider.store.current.snapshot), proof

    def _remember_decided(self, memo: AllowMemo, event: ExecEvent, fd: int,
                          decision: Decision, read_at: int, seen: Optional[Count]) -> None:
        """On the worker: keep an allow for the loop to answer the next exec of this file
        version from memory. Only an allow that stands for the file (file_decides), decided
        under the snapshot the memo is for, for the bytes the event named, never while the
        file has writers (agent/writers.py: a writable mapping changes the bytes without
        changing the identity), only when the file had settled before its bytes were read
        (a second write within the same ctime tick would keep the identity), and taken
        back when a write-open came after ``seen`` (the loop forgets the inode at each one;
        one before the put would otherwise be missed)."""
        snapshot = memo.snapshot
        if decision.policy_digest != snapshot.digest or not may_remember(snapshot, event.path):
            return
        if event.identity.ctime_ns >= read_at - SETTLE_NS:
            return
        try:
            unchanged = identity_of(os.fstat(fd)) == event.identity
        except OSError:
            return
        if unchanged and not has_writers(fd):
            memo.put(event.identity, decision)
            writes = self._writes()
            key = (event.identity.dev, event.identity.ino)
            if seen is not None and writes is not None and writes.count(*key) != seen:
                memo.forget(*key)

    def _lookup(self, event: ExecEvent) -> Optional[bool]:
        """On the fanotify loop: True when this file version has an allow that stands for
        it under the policy in force, else None (a worker decides). Memory only."""
        memo = self._memo
        if memo is None or memo.snapshot is not self.decider.store.current.snapshot:
            return None
        hit = memo.get(event.identity)
        if hit is None:
            return None
        if len(self._hits) >= HELD_MAX:
            self._hits.clear()  # the observer fell behind: those records are lost anyway
        self._hits[id(event)] = hit
        return True

    def _observe(self, outcome: Any) -> None:
        from agent.sensors.fanotify_backend import Cause

        event = outcome.event
        if outcome.cause is Cause.SHARED and event is not None:
            self._observe_shared(event, outcome)
            return
        if outcome.cause is Cause.CACHED and event is not None:
            self._observe_cached(event, outcome)
            return
        if outcome.cause is Cause.OVERLOAD and event is not None:
            self.record(Decision(
                event, outcome.allowed, Reason.UNVERIFIED, f"not verified: {outcome.detail}",
                Enforcement.NONE if outcome.allowed else self.enforcement, Source.DEFAULT,
                policy_version=self.decider.store.current.snapshot.version))
            return
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
            # allowed: monitor mode's answer for an exec nothing could be decided for
            self.record(Decision(event, False, Reason.VERIFY_FAILED,
                                 outcome.detail or f"denied: {outcome.cause.value}",
                                 Enforcement.MONITOR if outcome.allowed else self.enforcement,
                                 Source.DEFAULT))

    def _observe_shared(self, event: ExecEvent, outcome: Any) -> None:
        """An exec answered with the decision made for another exec of the same file
        version (the leader's outcome comes after this one, so its decision is still held)."""
        leader = outcome.leader
        with self._lock:
            held = self._pending.get(id(leader)) if leader is not None else None
        if held is not None:
            self.record(replace_decision(held[1], event=event, latency_us=outcome.latency_us,
                                         extra={**held[1].extra, "shared_with": leader.pid}))

    def _observe_cached(self, event: ExecEvent, outcome: Any) -> None:
        """An exec the loop answered from the allow memo: its first hit is recorded as a
        cache hit, later ones counted (``memo_hits``): a decision line per repeated allow
        would cost the agent more than the exec costs (the BPF backends' rule for kernel
        map hits; ignore-marked execs were never seen at all)."""
        hit = self._hits.pop(id(event), None)
        if hit is None:
            return
        if not outcome.allowed:  # the file changed since: CHANGED, not the memo's answer
            self.record(Decision(event, False, Reason.VERIFY_FAILED,
                                 "denied: changed since it was verified", self.enforcement,
                                 Source.DEFAULT,
                                 policy_version=self.decider.store.current.snapshot.version))
            return
        self._memo_hits += 1
        if not hit.recorded:
            hit.recorded = True
            self.record(replace_decision(hit.decision, event=event, source=Source.CACHE,
                                         latency_us=outcome.latency_us))

    def remember(self, path: str, identity: FileIdentity, allow: bool,
                 decided_under: Optional[PolicySnapshot] = None) -> None:
        """A pre-warmed allow (scan, close-after-write; on the pre-warm thread): the first
        exec of that file version is then answered on the loop from memory, never queued
        behind a flood. Only when the allow stands for the file under the policy in force
        (see AllowMemo). The file is decided once more here, through the trusted cache the
        pre-warm just filled, so the memo holds the whole decision the exec's record needs
        (digest, evidence, Go build info), exactly as after a worker's decision."""
        memo = self._memo
        if (not allow or memo is None or decided_under is None
                or decided_under is not memo.snapshot
                or decided_under is not self.decider.store.current.snapshot
                or not may_remember(decided_under, path)
                or not runs_means_allows(decided_under)):
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_NOCTTY)
        except OSError:
            return
        try:
            if identity_of(os.fstat(fd)) != identity:
                return  # changed since it was pre-verified
            read_at = time.time_ns()
            event = ExecEvent(pid=0, ppid=0, uid=-1, auid=-1, comm="", path=path,
                              identity=identity, timestamp_ns=read_at, backend=self.name)
            placed, in_scope, proof = self._placed(event, fd)
            if proof is None:
                return  # nothing would show a later change of its bytes: decided at exec
            decision, seen = self._judge(placed, fd, in_scope, proof, self._warm_decider)
            if answer_for(decision, self.enforcement, memo.snapshot) is True:
                self._remember_decided(memo, event, fd, decision, read_at, seen)
        except (OSError, ExecguardError):
            return
        finally:
            os.close(fd)

    def policy_changed(self, snapshot: PolicySnapshot) -> None:
        """A policy hook: files allowed under the old policy are asked again (a new, empty
        memo and no ignore mark: an old allow must not run past a revocation), and the
        answers the backend gives without a decision (deadline, overload) follow the new
        policy's mode."""
        if self._backend is not None:
            if (tuple(snapshot.scope_roots()) != self._scopes
                    or snapshot.file_decides != self._per_file):
                self._remark(snapshot)
            else:
                self._memo = AllowMemo(snapshot)  # before the marks go: no old allow stays
                self._backend.forget_allowed()
                self._backend.set_answers(snapshot.effective_on_timeout is Action.ALLOW,
                                          snapshot.mode is Mode.MONITOR)
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
        if backend.stats()["write_guard"]["state"] == "running":
            guard: Heartbeat = backend.guard_heartbeat
            why = guard.check(max_silence_s + GUARD_POLL_S)
            if why is not None:
                return why
        # the loop turns even when every decide worker is stuck (each exec then gets the
        # on_timeout answer, forever): execs waiting while no decision finished and no busy
        # worker ran for longer than the window (or the policy's deadline, when longer) mean
        # a wedged decide path; a slow one (a worker hashing a large file) still moves
        deadline = self.decider.store.current.snapshot.limits.decision_deadline_ms / 1000
        stalled = float(backend.stalled_s())
        if stalled > max(max_silence_s, deadline):
            return (f"{self.name}: execs waiting, no decision finished and no decide worker "
                    f"ran for {stalled:.1f}s (decide workers stuck)")
        return None

    def stop(self) -> None:
        if self._backend is not None:
            self._backend.stop()
        if self._watchdog is not None:
            self._watchdog.close()

    def stats(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(self._backend.stats()) if self._backend is not None else {}
        out["policy_swaps"] = self._swaps
        memo = self._memo
        out["remembered_allows"] = len(memo) if memo is not None else 0
        out["memo_hits"] = self._memo_hits
        return out


