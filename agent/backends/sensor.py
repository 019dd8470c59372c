"""kill and audit-only on the BCC exec sensor."""

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
    map_allows,
    open_exec_file,
    pump,
    replace_decision,
    rescope,
)
from agent.decide import Decider
from agent.decision import Decision, Enforcement, ExecEvent, FileIdentity, Source
from agent.errors import Reason
from agent.policy import Mode, PolicySnapshot
from agent.service.heartbeat import Heartbeat


class SensorRunner:
    """The BCC exec sensor: ``kill`` (SIGKILL before the first user instruction, for files on
    devices the policy scopes whole) or ``audit-only`` (decide and record, block nothing)."""

    POLL_MS = 100
    # An exec storm fills a 256 KiB ring (~790 events) within one 100 ms poll tick when the
    # host is busy (bench/exec_storm.py): a 4 MiB ring absorbs seconds of backlog, and a busy
    # tick is followed by a short one instead of a full sleep.
    RING_PAGES = 1024
    BUSY_RECORDS, BUSY_POLL_MS = 64, 5

    def __init__(self, name: str, decider: Decider, record: Record) -> None:
        self.name = name
        self.kill = name == "kill"
        self.enforcement = Enforcement.POST_EXEC_KILL if self.kill else Enforcement.AUDIT_ONLY
        self.decider = decider
        self.record = record
        self._sensor: Any = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.heartbeat = Heartbeat(f"{name} ring poll")
        self._recorded: Set[FileIdentity] = set()  # files whose kernel-map allow is logged
        self._kv = KernelVerdicts()
        self._n: Dict[str, int] = dict.fromkeys(
            ("records", "kernel_hits", "out_of_scope", "decided", "agent_kills", "vanished",
             "read_errors", "policy_swaps", "verdicts_dropped"), 0)

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
        when a rule depends on the caller (uids, gids): one caller's allow in the map would
        let every other caller run the file unjudged. Then every exec is decided here and
        a denied one is killed by the agent after verification."""
        return self.kill and not snapshot.caller_dependent

    def start(self) -> None:
        sensor = self._open_sensor()
        if self.enforcing() and self._kernel_judges(self.decider.store.current.snapshot):
            # the kernel kills only on devices the policy covers whole: a scope root that is
            # a mount point; other scopes get the agent's own (later) kill
            rescope(sensor, self.decider.store.current.snapshot)
            sensor.set_mode(kill=True, deny_unknown=True)
        else:
            sensor.set_mode(kill=False, deny_unknown=False)
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-poll", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        pump(self._sensor, self._stop, self._handle, self._n, "read_errors",
             self.POLL_MS, self.BUSY_POLL_MS, self.BUSY_RECORDS, heartbeat=self.heartbeat)

    def _handle(self, rec: Any) -> None:
        from agent.sensors.decode import KernelAction, KernelState

        self._n["records"] += 1
        if rec.read_error:
            self._n["read_errors"] += 1
            return
        event: ExecEvent = rec.event
        snapshot = self.decider.store.current.snapshot
        if rec.state is KernelState.ALLOW:
            # The kernel map repeats an allow: record the first exec of each file (it may
            # have been pre-warmed, never run), then count only, as the fanotify path never
            # even sees an ignore-marked exec.
            self._n["kernel_hits"] += 1
            if event.identity not in self._recorded and snapshot.in_scope(event.path):
                if len(self._recorded) >= RECORDED_MAX:
                    self._recorded.clear()
                self._recorded.add(event.identity)
                self.record(Decision(event, True, Reason.OK, "kernel verdict map hit",
                                     Enforcement.NONE, Source.CACHE,
                                     policy_version=snapshot.version))
            return
        if not snapshot.in_scope(event.path) and rec.action is KernelAction.NONE:
            self._n["out_of_scope"] += 1  # the sensor sees every exec on the host
            return
        generation = self._kv.generation
        fd = open_exec_file(event)
        if fd is None:
            self._n["vanished"] += 1
            killed = rec.action is KernelAction.KILLED
            self.record(Decision(event, not killed, Reason.VERIFY_FAILED,
                                 "the process exited before its file could be opened",
                                 self.enforcement if killed else Enforcement.NONE,
                                 Source.DEFAULT, policy_version=snapshot.version))
            return
        try:
            decision = self.decider.decide(event, fd, self.enforcement)
        finally:
            os.close(fd)
        self._n["decided"] += 1
        if snapshot.in_scope(event.path) and self._kernel_judges(snapshot):
            self._kv.write(self._sensor, event.identity, map_allows(decision, snapshot.mode),
                           generation)
        if rec.action is KernelAction.KILLED:
            if decision.allow:  # killed as unknown; trusted now, so the next exec runs
                decision = replace_decision(decision, allow=False, reason=Reason.UNVERIFIED,
                                    enforcement=self.enforcement,
                                    detail="killed: not verified before its first exec; "
                                    f"verified since ({decision.detail}): the next exec runs")
            else:
                decision = replace_decision(decision, enforcement=self.enforcement)
        elif not decision.allow and decision.enforcement is self.enforcement and self.kill:
            try:  # outside the kernel's scope: the agent kills after verifying
                os.kill(event.pid, signal.SIGKILL)
                self._n["agent_kills"] += 1
                decision = replace_decision(decision,
                                            extra={"killed_by": "agent, after verification"})
            except ProcessLookupError:
                decision = replace_decision(decision,
                                            extra={"killed_by": "nobody: it had exited"})
        self.record(decision)

    def alive(self, max_silence_s: float) -> Optional[str]:
        """None while the ring poll loop turns (the service watchdog's proof), else why not."""
        if self._thread is None or not self._thread.is_alive():
            return f"{self.heartbeat.name} thread not running"
        return self.heartbeat.check(max_silence_s)

    def remember(self, path: str, identity: FileIdentity, allow: bool,
                 decided_under: Optional[PolicySnapshot] = None) -> None:
        """A pre-warm verdict into the kernel map; one decided under a policy that has
        been swapped out since is dropped (the swap emptied the map for the new policy)."""
        generation = self._kv.generation  # first: a swap from here on makes the write fail
        snapshot = self.decider.store.current.snapshot
        if decided_under is not None and decided_under is not snapshot:
            return
        if self._sensor is not None and self._kernel_judges(snapshot) and \
                snapshot.in_scope(path):
            self._kv.write(self._sensor, identity, allow, generation)

    def policy_changed(self, snapshot: PolicySnapshot) -> None:
        """A policy hook: kills follow the new mode and scope, and the kernel forgets every
        verdict decided under the old policy (each file is decided again at its next exec)."""
        sensor = self._sensor
        if sensor is None:
            return
        kill = snapshot.mode is Mode.ENFORCE and self._kernel_judges(snapshot)
        if not kill:
            sensor.set_mode(kill=False, deny_unknown=False)  # loosen before anything else
        self._n["verdicts_dropped"] += self._kv.reset(sensor)
        self._recorded.clear()
        if kill:
            rescope(sensor, snapshot)
        sensor.set_mode(kill=kill, deny_unknown=kill)
        self._n["policy_swaps"] += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sensor is not None:
            self._sensor.close()

    def stats(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(self._n)
        if self._sensor is not None:
            out["sensor"] = self._sensor.stats().__dict__
        return out
