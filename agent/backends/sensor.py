"""kill and audit-only on the BCC kill sensor (exec_sensor.c)."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Dict, Optional, Set

from agent.backends.base import (
    RECORDED_MAX,
    KernelVerdicts,
    Record,
    SelftestResult,
    open_mapped_file,
    pump,
    replace_decision,
)
from agent.backends.kernel_scope import KernelScope
from agent.backends.records import KernelRecords
from agent.decide import Decider
from agent.decision import Decision, Enforcement, ExecEvent, FileIdentity
from agent.errors import Reason
from agent.policy import Mode, PolicySnapshot
from agent.scope import mountinfo
from agent.scope.mountinfo import join, under
from agent.service.heartbeat import Heartbeat


class SensorRunner(KernelRecords):
    """The BCC kill sensor: ``kill`` (SIGKILL before the first instruction of a denied
    program or PROT_EXEC mapping in scope) or ``audit-only`` (decide and record, block
    nothing). Files are placed like the BPF LSM backends place them (``KernelScope``:
    filesystem classes, scope directories, loaders, guards, following mount changes)."""

    POLL_MS = 100
    # An exec storm fills a 256 KiB ring (~790 events) within one 100 ms poll tick when the
    # host is busy (bench/exec_storm.py): a 4 MiB ring absorbs seconds of backlog, and a busy
    # tick is followed by a short one instead of a full sleep.
    RING_PAGES = 1024
    BUSY_RECORDS, BUSY_POLL_MS = 64, 5
    RECORDED_MAX = RECORDED_MAX

    def __init__(self, name: str, decider: Decider, record: Record) -> None:
        self.name = name
        self.kill = name == "kill"
        self.enforcement = Enforcement.POST_EXEC_KILL if self.kill else Enforcement.AUDIT_ONLY
        self.decider = decider
        self.record = record
        self._sensor: Any = None
        self._scope: Optional[KernelScope] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.heartbeat = Heartbeat(f"{name} ring poll")
        self._recorded: Set[FileIdentity] = set()  # files whose kernel-map allow is logged
        self._kv = KernelVerdicts()
        self._n: Dict[str, Any] = dict.fromkeys(
            ("records", "kernel_hits", "kernel_kills", "decided", "agent_kills", "vanished",
             "read_errors", "policy_swaps", "verdicts_dropped", "mappings",
             "mappings_allowed_unlogged", "loader_denials", "mounts_refused",
             "ptrace_refused"), 0)
        self._n["kernel_judges"] = "off"

    def _open_sensor(self) -> Any:
        if self._sensor is None:
            from agent.sensors.bpf_exec import BpfExecSensor, SensorConfig

            self._sensor = BpfExecSensor(SensorConfig(ringbuf_pages=self.RING_PAGES))
        return self._sensor

    def selftest(self) -> SelftestResult:
        from agent.sensors.errors import SensorUnavailable
        from agent.sensors.selftest import run_selftest

        try:
            sensor = self._open_sensor()
        except SensorUnavailable as exc:
            return SelftestResult(False, f"{self.name}: {exc.diagnostics()}")
        result = run_selftest(sensor, kill=self.kill)
        return SelftestResult(result.ok, f"{self.name}: {result.detail}")

    def enforcing(self) -> bool:
        return self.kill and self.decider.store.current.snapshot.mode is Mode.ENFORCE

    def _kernel_judges(self, snapshot: PolicySnapshot) -> bool:
        """The kernel's per-file verdicts may decide (kill, or let a cache hit pass). Not
        when a rule depends on the caller (uids, gids: one caller's allow in the map would
        let every other caller run the file unjudged) or on paths (no rename hook here: a
        verdict earned in one directory would follow the file, or its directory, to a path
        a rule denies). Then no verdict is written, every exec and mapping in scope is
        decided here, and a denied one is killed by the agent after verification."""
        return self.kill and snapshot.file_decides

    def _per_file_ok(self, snapshot: PolicySnapshot) -> bool:
        return self._kernel_judges(snapshot)

    def _judged_late(self, snapshot: PolicySnapshot) -> bool:
        """No verdict in the kernel: every denial is the agent's (audit-only: recorded as
        it is, nothing stopped)."""
        return not self._kernel_judges(snapshot)

    def _arm(self, snapshot: PolicySnapshot) -> None:
        """The kernel's knobs for this policy. Enforce mode kills in the kernel: denied and
        unknown files when per-file verdicts may decide; otherwise only what depends on no
        verdict (a dynamic loader run as a program), the rest is killed by the agent."""
        sensor = self._sensor
        kill = self.kill and snapshot.mode is Mode.ENFORCE
        judges = kill and self._kernel_judges(snapshot)
        sensor.set_mode(enforce=kill, deny_unknown=judges)
        self._n["kernel_judges"] = ("every file in scope" if judges else
                                    "loader only (rules on callers or paths: the agent "
                                    "judges each exec)" if kill else "off")

    def start(self) -> None:
        sensor = self._open_sensor()
        snapshot = self.decider.store.current.snapshot
        # every filesystem the agent sees gets its class before anything is enforced
        self._scope = KernelScope(sensor, snapshot)
        self._scope.start()
        self._scope.start_fuse_breaker(snapshot.limits.decision_deadline_ms / 1000)
        sensor.exempt(os.getpid())  # after the self-test, whose canary must not be exempt
        self._arm(snapshot)
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-poll", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        pump(self._sensor, self._stop, self._handle, self._n, "read_errors",
             self.POLL_MS, self.BUSY_POLL_MS, self.BUSY_RECORDS, heartbeat=self.heartbeat)

    def _handle(self, rec: Any) -> None:
        """One kernel record (agent/backends/records.py); stopped = the kernel killed it."""
        from agent.sensors.decode import KernelAction

        self._n["records"] += 1
        killed = rec.action is KernelAction.KILLED
        self._n["kernel_kills"] += int(killed)
        if rec.read_error:
            self._n["read_errors"] += 1
        self._dispatch(rec, killed)

    def _handle_exec(self, rec: Any, killed: bool) -> None:
        from agent.sensors.decode import KernelState

        event: ExecEvent = rec.event
        snapshot = self.decider.store.current.snapshot
        if rec.state is KernelState.ALLOW:
            self._record_kernel_hit(event, snapshot)
            return
        fd = self._exec_file(event)  # killed: gone; then its path, if that inode
        if fd is None:
            self._unreadable(rec, killed, "exec")
            return
        decision = self._decide_and_remember(event, fd, snapshot)
        if killed and decision.allow:  # killed as unknown; trusted now, so the next exec runs
            decision = replace_decision(decision, allow=False, reason=Reason.UNVERIFIED,
                                        enforcement=self.enforcement,
                                        detail="killed: not verified before its first exec; "
                                        f"verified since ({decision.detail}): the next exec "
                                        "runs")
        elif killed:
            decision = replace_decision(decision, enforcement=self.enforcement)
        elif not decision.allow and decision.enforcement is self.enforcement and self.kill:
            decision = self._stop_late(decision)
        self.record(decision)

    def _stop_late(self, decision: Decision) -> Decision:
        """The kernel let it run (the policy leaves it to the agent, or the kill failed):
        the agent kills it after verifying. It may have run by then: the record says so.
        audit-only stops nothing."""
        if not self.kill:
            return decision
        try:
            os.kill(decision.event.pid, signal.SIGKILL)
            self._n["agent_kills"] += 1
            return replace_decision(decision, extra={**decision.extra,
                                                     "killed_by": "agent, after verification"})
        except ProcessLookupError:
            return replace_decision(decision, extra={**decision.extra,
                                                     "killed_by": "nobody: it had exited"})

    def _record_mapping(self, decision: Decision) -> None:
        """Without kernel verdicts (audit-only, rules on callers or paths) every mapping of a
        file in scope comes back here, each library of each process: an allowed one is
        counted, not logged (its exec's decision is); a denied one is always logged."""
        if decision.allow and not self._kernel_judges(self.decider.store.current.snapshot):
            self._n["mappings_allowed_unlogged"] += 1
            return
        self.record(decision)

    def _mapped_file(self, event: ExecEvent) -> Optional[int]:
        """A killed mapping's process is gone, so /proc/PID/map_files cannot name its file:
        the record carries the file's path within its filesystem, tried through every mount
        of that filesystem the agent has (the inode must match)."""
        fd = open_mapped_file(event, self._key_of)
        if fd is not None or self._scope is None or not event.path.startswith("/"):
            return fd
        want = (event.identity.dev, event.identity.ino)
        try:
            mounts = mountinfo.read()
        except OSError:
            return None
        for m in mounts:
            if m.dev != want[0] or not under(event.path, m.root):
                continue
            rest = event.path if m.root == "/" else event.path[len(m.root):]
            try:
                fd = os.open(join(m.point, rest), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                continue
            if self._key_of(fd) == want:
                return fd
            os.close(fd)
        return None

    def alive(self, max_silence_s: float) -> Optional[str]:
        """None while the ring poll loop and the mount watcher turn (the service watchdog's
        proof), else why not."""
        if self._thread is None or not self._thread.is_alive():
            return f"{self.heartbeat.name} thread not running"
        why = self._scope.alive() if self._scope is not None else None
        return why or self.heartbeat.check(max_silence_s)

    def remember(self, path: str, identity: FileIdentity, allow: bool,
                 decided_under: Optional[PolicySnapshot] = None) -> None:
        """A pre-warm verdict into the kernel map (a denial only where no verdict is yet),
        keyed as the kernel sees the file and only while it has no writer; one decided under
        a policy that has been swapped out since is dropped (the swap emptied the map)."""
        generation = self._kv.generation  # first: a swap from here on makes the write fail
        snapshot = self.decider.store.current.snapshot
        if decided_under is not None and decided_under is not snapshot:
            return
        if self._sensor is None or not (self._kernel_judges(snapshot)
                                        and snapshot.in_scope(path)):
            return
        self._publish_path(path, identity, allow, generation)

    def prescan_done(self, snapshot: PolicySnapshot, complete: bool) -> None:
        """The pre-scan finished (agent/prewarm.py): with every file of the scope verified,
        a mapping of a file without a verdict is killed from now on (kernel_scope)."""
        if self._scope is not None:
            self._scope.prescan_done(snapshot, complete)

    def policy_changed(self, snapshot: PolicySnapshot) -> None:
        """A policy hook: kills follow the new mode and scope, and the kernel forgets every
        verdict decided under the old policy (each file is decided again at its next exec)."""
        sensor = self._sensor
        if sensor is None:
            return
        if not (self.kill and snapshot.mode is Mode.ENFORCE and self._kernel_judges(snapshot)):
            # loosen before anything else
            sensor.set_mode(enforce=self.kill and snapshot.mode is Mode.ENFORCE,
                            deny_unknown=False)
        self._n["verdicts_dropped"] += self._kv.reset(sensor)
        self._recorded.clear()
        if self._scope is not None:
            self._scope.policy_changed(snapshot)
        self._arm(snapshot)
        self._n["policy_swaps"] += 1

    def stop(self) -> None:
        self._stop.set()
        if self._scope is not None:
            self._scope.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sensor is not None:
            self._sensor.close()  # the programs go with it: nothing is killed any more

    def stats(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(self._n)
        if self._sensor is not None:
            out["sensor"] = self._sensor.stats().__dict__
            out["mapping_hook"] = "on" if self._sensor.mappings else "unavailable"
        if self._scope is not None:
            out["scope"] = self._scope.stats()
        return out
