"""What a BPF runner does with the kernel's records, shared by bpf-lsm/fmod-ret (LsmRunner)
and kill/audit-only (SensorRunner), so both place, verify, publish and word decisions alike.

A record says what the kernel saw (an exec, a PROT_EXEC mapping, a refused mount or ptrace)
and whether it *stopped* it: EPERM from an LSM hook, SIGKILL from the kill backend. The
runner then decides the file where it really is (agent/scope), writes its verdict when no
writer holds it (agent/writers.py), and records one decision that says what happened.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Set, Tuple

from agent.backends.base import (
    KernelVerdicts,
    Record,
    identity_of,
    map_allows,
    open_exec_file,
    open_mapped_file,
    replace_decision,
)
from agent.backends.kernel_scope import KernelScope
from agent.backends.scripts import PATH_CUT, open_script
from agent.decide import Decider
from agent.decision import Decision, Enforcement, ExecEvent, FileIdentity, Source
from agent.errors import Reason
from agent.policy import PolicySnapshot
from agent.scope.live import judged_in_scope
from agent.writers import has_writers


class KernelRecords:
    """Mixin for a runner over a BPF sensor. The runner provides the attributes below and
    ``_handle_exec``; ``_per_file_ok`` says whether one exec's verdict may stand for the
    file; ``_judged_late`` whether a denial the kernel let run is killed by the agent."""

    decider: Decider
    record: Record
    enforcement: Enforcement
    RECORDED_MAX: int
    _n: Dict[str, Any]
    _kv: KernelVerdicts
    _sensor: Any
    _scope: Optional[KernelScope]
    _recorded: Set[FileIdentity]

    def _handle_exec(self, rec: Any, stopped: bool) -> None:
        raise NotImplementedError

    def _per_file_ok(self, snapshot: PolicySnapshot) -> bool:
        raise NotImplementedError

    def _judged_late(self, snapshot: PolicySnapshot) -> bool:
        """The kernel judges nothing for this policy, the agent stops denials itself."""
        return False

    def _stop_late(self, decision: Decision) -> Decision:
        """Stop a denied process the kernel let run (the kill backend); the decision then
        says what was done."""
        return decision

    def _key_of(self, fd: int) -> Optional[Tuple[int, int]]:
        """(dev, ino) of an open file as the kernel's hooks (and so its records) see it."""
        if self._scope is not None:
            return self._scope.kernel_key(fd)
        st = os.fstat(fd)
        return st.st_dev, st.st_ino

    def _identity(self, fd: int) -> FileIdentity:
        """The identity a kernel verdict for the open file is keyed with (agent/scope: on an
        overlay, stat() names the layer's file, the kernel the overlay's)."""
        if self._scope is not None:
            return self._scope.identity(fd)
        return identity_of(os.fstat(fd))

    def _exec_file(self, event: ExecEvent) -> Optional[int]:
        """The exec'd file, open: /proc/PID/exe or the exec's path (open_exec_file), else
        the path through a mount of the agent's of the file's filesystem. A process that
        was killed, or denied, in a container had its root at that filesystem's root (a
        runtime pivots into the rootfs), so the path it exec'd is the path within it; the
        inode found must be the record's, so a wrong guess opens nothing."""
        fd = open_exec_file(event, self._key_of)
        if fd is not None or self._scope is None or not event.path.startswith("/"):
            return fd
        for path in self._scope.tracker.paths_of(event.identity.dev, event.path):
            fd = open_exec_file(dataclasses.replace(event, path=path, pid=0), self._key_of)
            if fd is not None:
                return fd
        return None

    def _mapped_file(self, event: ExecEvent) -> Optional[int]:
        """The file a mapping record names, open, or None."""
        return open_mapped_file(event, self._key_of)

    def _dispatch(self, rec: Any, stopped: bool) -> None:
        """One kernel record: an exec, a mapping, or a refused mount or ptrace."""
        from agent.sensors.decode import Op

        if self._scope is not None:  # a FUSE file it opens is on the breaker's list first
            self._scope.watch(rec.event.identity.dev)
        if rec.op in (Op.MOUNT, Op.PTRACE):
            self._record_guard(rec, stopped)
        elif rec.op is Op.TAMPER:
            self._record_tamper(rec)
        elif rec.op is Op.SCRIPT:
            self._handle_script(rec)
        elif rec.loader:
            self._record_loader(rec, stopped)
        elif rec.op is Op.EXEC:
            self._handle_exec(rec, stopped)
        else:
            self._handle_mapping(rec, stopped)

    def _handle_script(self, rec: Any) -> None:
        """An interpreter outside every scope started for a file that was exec'd (a #!
        script, binfmt_misc): the kernel saw only the interpreter. The file is opened by
        the name the caller gave, from the caller's root and working directory, placed, and
        judged when it is in scope; the kill backend then kills the interpreter late (it
        may have run a while), audit-only records. A file swapped at that name in between
        is what gets judged: the record's path and identity say which one."""
        event: ExecEvent = rec.event
        if len(event.path.encode()) >= PATH_CUT:  # the record's name was cut: a guess at best
            self._n["scripts_truncated"] = self._n.get("scripts_truncated", 0) + 1
        fd = open_script(event)
        if fd is None:
            self._n["scripts_unreadable"] = self._n.get("scripts_unreadable", 0) + 1
            return
        try:
            event = dataclasses.replace(event, identity=identity_of(os.fstat(fd)))
            event, in_scope = self._placed(event, fd)
            snapshot = self.decider.store.current.snapshot
            if not (snapshot.in_scope(event.path) if in_scope is None else in_scope):
                return  # an out-of-scope script: nothing to say
            self._n["scripts_judged"] = self._n.get("scripts_judged", 0) + 1
            decision = self.decider.decide(event, fd, self.enforcement, in_scope=in_scope,
                                           rehash=True)
        finally:
            os.close(fd)
        if not decision.allow and decision.enforcement is self.enforcement:
            decision = self._stop_late(decision)
        self.record(decision)

    def _record_kernel_hit(self, event: ExecEvent, snapshot: PolicySnapshot,
                           detail: str = "kernel verdict map hit") -> None:
        """The kernel map repeats an allow: record the first exec of each file version (it
        may only have been pre-warmed), then count: a decision line per cache hit would cost
        the agent more than the exec costs the kernel."""
        self._n["kernel_hits"] += 1
        if event.identity not in self._recorded:
            if len(self._recorded) >= self.RECORDED_MAX:
                self._recorded.clear()
            self._recorded.add(event.identity)
            self.record(Decision(event, True, Reason.OK, detail, Enforcement.NONE, Source.CACHE,
                                 policy_version=snapshot.version))

    def _handle_mapping(self, rec: Any, eperm: bool) -> None:
        """A PROT_EXEC mapping of a file in scope that had no allow verdict: verify the file
        (its verdict then holds from the next mapping) and say what happened to this one."""
        op = rec.op.name.lower()
        self._n["mappings"] += 1
        event: ExecEvent = rec.event
        fd = self._mapped_file(event)
        if fd is None:
            self._unreadable(rec, eperm, op)
            return
        snapshot = self.decider.store.current.snapshot
        decision = self._decide_and_remember(event, fd, snapshot)
        extra = {**decision.extra, "op": op}
        if eperm:
            if decision.allow or decision.enforcement is not self.enforcement:
                why = ("open for write when it was mapped" if rec.writers else
                       "changed since the agent started" if rec.fresh else "not verified")
                decision = replace_decision(
                    decision, allow=False, extra=extra, enforcement=self.enforcement,
                    reason=Reason.OPEN_FOR_WRITE if rec.writers else Reason.UNVERIFIED,
                    detail=f"mapping denied: {why} and not verified before it was mapped; "
                    f"verified since ({decision.detail})")
            else:
                decision = replace_decision(decision, extra=extra)
        elif not decision.allow and decision.enforcement is self.enforcement:
            if self._judged_late(snapshot):
                decision = self._stop_late(replace_decision(decision, extra=extra))
            else:
                # allowed at once (untouched since before the agent started, not verified
                # yet): it ran this time, and its verdict stands from the next mapping
                decision = replace_decision(
                    decision, allow=True, enforcement=Enforcement.NONE,
                    extra={**extra, "late": True},
                    detail=f"mapped before it was verified (unchanged since before the agent "
                    f"started): ran this once; from the next mapping: {decision.detail}")
        else:
            decision = replace_decision(decision, extra=extra)
        self._record_mapping(decision)

    def _record_mapping(self, decision: Decision) -> None:
        """Record the decision on one mapping."""
        self.record(decision)

    def _decide_and_remember(self, event: ExecEvent, fd: int,
                             snapshot: PolicySnapshot) -> Decision:
        """Decide the open file ``fd`` where it really is (agent/scope), and write the
        verdict for the file when no writer holds it (agent/writers.py)."""
        generation = self._kv.generation
        try:
            ident = self._identity(fd)
            event, in_scope = self._placed(event, fd)
            # the kernel had no allow for it: nothing keyed by identity is trusted (a write
            # through a shared mapping made writable earlier keeps the stamp)
            decision = self.decider.decide(event, fd, self.enforcement, in_scope=in_scope,
                                           rehash=True)
            self._n["decided"] += 1
            if self._per_file_ok(snapshot):
                self._publish(fd, ident, map_allows(decision, snapshot.mode), generation)
        finally:
            os.close(fd)
        return decision

    def _placed(self, event: ExecEvent, fd: int) -> Tuple[ExecEvent, Optional[bool]]:
        """The event under the file's canonical path, and whether it is in scope (a file
        reached through another namespace's mount, or without a name, is)."""
        if self._scope is None:
            return event, None
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
            place = self._scope.tracker.place_fd(fd, link, event.pid)
        except OSError:
            return event, True
        snapshot = self.decider.store.current.snapshot
        return (dataclasses.replace(
            event, path=place.path, rules_path=None if place.trusted else place.judged_path),
                judged_in_scope(place, snapshot))

    def _publish(self, fd: int, ident: FileIdentity, allow: bool, generation: int,
                 insert_only: bool = False) -> bool:
        """Write a verdict only while nobody holds the file open for write, and take it back
        if a writer opened meanwhile (the kernel's own open hook drops it too).
        ``insert_only``: never over a verdict already there (a pre-scan's denial)."""
        if has_writers(fd):
            self._n["not_published_writers"] = self._n.get("not_published_writers", 0) + 1
            return False
        written = self._kv.write(self._sensor, ident, allow, generation, insert_only)
        if written and has_writers(fd):
            self._sensor.forget(ident)
            return False
        return written

    def _publish_path(self, path: str, identity: FileIdentity, allow: bool,
                      generation: int) -> None:
        """A pre-warm verdict for ``path`` into the kernel map, keyed as the kernel sees the
        file, only while it is still the version that was decided (and has no writer:
        _publish); a denial only where no verdict is yet."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return
        try:
            ident = self._identity(fd)
            if (ident.ctime_ns, ident.size) == (identity.ctime_ns, identity.size):
                self._publish(fd, ident, allow, generation, insert_only=not allow)
        finally:
            os.close(fd)

    def _unreadable(self, rec: Any, eperm: bool, op: str) -> None:
        snapshot = self.decider.store.current.snapshot
        self._n["vanished"] += 1
        reason, detail = ((Reason.NO_PATH, "the file has no name (memfd, O_TMPFILE, or "
                           "deleted): it cannot be verified") if rec.pathless else
                          (Reason.VERIFY_FAILED, "the file was gone before it could be "
                           "verified"))
        self.record(Decision(rec.event, not eperm, reason, detail,
                             self.enforcement if eperm else Enforcement.NONE, Source.DEFAULT,
                             policy_version=snapshot.version, extra={"op": op}))

    def _record_loader(self, rec: Any, eperm: bool) -> None:
        self._n["loader_denials"] += 1
        snapshot = self.decider.store.current.snapshot
        self.record(Decision(
            rec.event, not eperm, Reason.LOADER_EXEC,
            "a dynamic loader run as a program (the file it loads would run unverified; "
            "policy boundary.loader = \"allow\" permits it)",
            self.enforcement if eperm else Enforcement.MONITOR, Source.RULE,
            policy_version=snapshot.version, extra={"op": "exec"}))

    def _record_tamper(self, rec: Any) -> None:
        """Self-protection refused an attempt on the agent (exec_verdict.h EG_TAMPER_*)."""
        from agent.backends.tamper import describe_attempt

        self._n["tamper_refused"] = self._n.get("tamper_refused", 0) + 1
        attempt, what = describe_attempt(rec.aux, rec.event)
        by = rec.event.comm or f"pid {rec.event.pid}"
        snapshot = self.decider.store.current.snapshot
        self.record(Decision(
            rec.event, False, Reason.TAMPER,
            f"{what}, by {by} (pid {rec.event.pid}, uid {rec.event.uid}): refused by "
            "self-protection (on_agent_exit = \"keep-enforcing\")",
            self.enforcement, Source.RULE, policy_version=snapshot.version,
            extra={"op": "tamper", "attempt": attempt}))

    def _record_guard(self, rec: Any, eperm: bool) -> None:
        from agent.sensors.decode import Op

        snapshot = self.decider.store.current.snapshot
        if rec.op is Op.MOUNT:
            self._n["mounts_refused"] += 1
            reason = Reason.MOUNT_INTO_SCOPE
            detail = (f"a mount onto a path in scope (flags {rec.aux:#x}), by "
                      f"{rec.event.comm or 'pid ' + str(rec.event.pid)}: refused while the "
                      "scopes leave part of the host out (policy boundary.mounts)")
            extra: Dict[str, Any] = {"op": "mount", "mount_flags": rec.aux}
        else:
            self._n["ptrace_refused"] += 1
            reason = Reason.PTRACE_INTO_SCOPE
            detail = (f"ptrace attach to pid {rec.aux}, whose program is in scope, by "
                      f"{rec.event.comm or 'pid ' + str(rec.event.pid)} (policy "
                      "boundary.ptrace)")
            extra = {"op": "ptrace", "target_pid": rec.aux}
        self.record(Decision(rec.event, not eperm, reason, detail,
                             self.enforcement if eperm else Enforcement.MONITOR,
                             Source.RULE, policy_version=snapshot.version, extra=extra))
