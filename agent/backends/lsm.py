"""bpf-lsm and fmod-ret: the kernel refuses the exec from its verdict map; fanotify
fills the map for first-seen binaries while their exec waits at open."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from typing import Any, Dict, Optional, Set, Tuple, Union

from agent.backends.base import (
    KernelVerdicts,
    Record,
    SelftestResult,
    canary_into,
    drop_tmpfs,
    identity_key,
    identity_of,
    map_allows,
    private_tmpfs,
    pump,
    replace_decision,
    run_canary,
    with_exe,
)
from agent.backends.fanotify import FanotifyRunner, answer_for
from agent.backends.kernel_scope import KernelScope
from agent.backends.records import KernelRecords
from agent.backends.tamper import SelfProtection
from agent.decide import Decider
from agent.decision import Decision, Enforcement, ExecEvent, FileIdentity, Source
from agent.errors import ExecguardError, Reason
from agent.policy import Mode, PolicySnapshot
from agent.sensors.bpf_lsm import Guards
from agent.sensors.fanotify_model import ALLOW_ONCE, AllowOnce
from agent.service.heartbeat import Heartbeat
from agent.writers import has_writers

# an overlay file with no verdict of its own, allowed by its layer file's (exec_verdict.h)
LAYER_HIT = "kernel verdict map hit: the overlay's layer file underneath"


def _say(message: str) -> None:
    print(f"execguard: {message}", file=sys.stderr, flush=True)


class _FanotifyFeeder(FanotifyRunner):
    """FAN_OPEN_EXEC_PERM as the synchronous slow path of the BPF LSM backend: an unknown
    binary is verified while its exec waits at open, the verdict map is written, and only
    then is the open answered, so bprm_check_security (which runs later) finds the verdict.
    Files on devices outside the LSM scope are enforced by fanotify's own answer."""

    # Ignore marks stay (without them every exec in scope waits for this Python loop: +50 %
    # per exec in the VM bench). An ignore mark outlives what no fanotify event removes
    # (chmod, chown, utimes, rename, link), so the kernel keeps its verdict through those
    # (EG_VF_ATTR, EG_VF_MOVED in exec_verdict.h): bprm_check still finds it.

    def __init__(self, lsm: LsmRunner) -> None:
        super().__init__("fanotify-exec", lsm.decider, lsm.record)
        self.lsm = lsm

    def _decide(self, event: ExecEvent, fd: int) -> Union[bool, AllowOnce]:
        decision = self.lsm.fill(with_exe(event), fd)
        snapshot = self.decider.store.current.snapshot
        if decision is not None and snapshot.caller_dependent and not decision.allow \
                and decision.enforcement is self.lsm.enforcement:
            # rules on the caller: the map's one entry for the file serves every caller, and
            # another caller's allow could land in it before this exec reaches bprm_check;
            # the open itself refuses this caller (no bprm_check, so the record is made here)
            self.lsm.record_filled(decision)
            return False
        if decision is not None:  # the map holds the verdict: the LSM hook enforces it
            # but a monitor rule's would-deny must be asked again (see answer_for)
            answer = answer_for(decision, self.lsm.enforcement, snapshot)
            return ALLOW_ONCE if answer is ALLOW_ONCE else True
        return super()._decide(event, fd)

    def _observe(self, outcome: Any) -> None:
        event = outcome.event
        if event is None or not self.lsm.covers(event.identity):
            super()._observe(outcome)  # the kernel's record reports execs the LSM covers


class LsmRunner(KernelRecords):
    """BPF LSM: bprm_check_security returns EPERM for files on scoped devices whose verdict
    is deny, or which are unknown in enforce mode. The verdict map is filled before execs
    (pre-scan via ``remember``), synchronously by fanotify where it exists (enforce mode),
    and after a denied first exec by the poll thread, so the next exec of a trusted file runs.
    """

    POLL_MS = 100
    RING_PAGES = 256
    HELD_MAX = 4096  # fanotify decisions waiting for the kernel's record of the same exec
    RECORDED_MAX = 65536  # file versions whose allow hit is already in the decision log
    ENFORCEMENT = Enforcement.LSM_DENY
    # the canary ran although unknown: the program attached, yet never ran
    NEVER_RAN = "the hook attached but never ran (is bpf in /sys/kernel/security/lsm?)"

    def __init__(self, name: str, decider: Decider, record: Record,
                 fanotify: bool = True) -> None:
        self.name = name
        self.enforcement = self.ENFORCEMENT
        self.decider = decider
        self.record = record
        self.use_fanotify = fanotify
        self._sensor: Any = None
        self._scope: Optional[KernelScope] = None
        self._feeder: Optional[_FanotifyFeeder] = None
        self._held: Dict[Tuple[int, int, int, int], Decision] = {}
        self._recorded: Set[FileIdentity] = set()
        self._lock = threading.Lock()
        self._kv = KernelVerdicts()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.heartbeat = Heartbeat(f"{name} ring poll")
        self.tamper = SelfProtection(name, _say)
        self._n: Dict[str, Any] = dict.fromkeys(
            ("records", "kernel_hits", "kernel_denials", "decided", "filled_by_fanotify",
             "vanished", "errors", "policy_swaps", "verdicts_dropped", "mappings",
             "loader_denials", "mounts_refused", "ptrace_refused"), 0)
        self._n["fanotify"] = "off"

    def _open_sensor(self) -> Any:
        if self._sensor is None:
            from agent.sensors.bpf_exec import SensorConfig

            self._sensor = self._new_sensor(SensorConfig(ringbuf_pages=self.RING_PAGES))
        return self._sensor

    def _new_sensor(self, config: Any) -> Any:
        from agent.sensors.bpf_lsm import BpfLsmSensor

        return BpfLsmSensor(config)

    def selftest(self) -> SelftestResult:
        """Canary on a private tmpfs: unknown -> EPERM, allowed -> runs; and the kernel's
        identity of it must equal stat() (catches wrong struct offsets)."""
        from agent.sensors.errors import SensorUnavailable

        try:
            sensor = self._open_sensor()
        except SensorUnavailable as exc:
            return SelftestResult(False, f"{self.name}: {exc.diagnostics()}")
        mnt = private_tmpfs()
        dev = None
        try:
            canary = canary_into(mnt)
            ident = identity_of(os.stat(canary))
            dev = ident.dev
            sensor.add_scope_dev(dev)
            # only the canary's tmpfs is in scope: before start() no filesystem has a
            # class, and unseen ones would otherwise be in scope (every exec on the host)
            sensor.set_mode(enforce=True, deny_unknown=True, guards=Guards(unseen_out=True))
            denied = run_canary(canary)
            sensor.set_verdict(ident, True)
            allowed = run_canary(canary)
            seen = [r for r in sensor.poll(0) if r.record.event.path == canary]
        except (OSError, subprocess.SubprocessError, ExecguardError) as exc:
            return SelftestResult(False, f"{self.name} self-test failed: {exc}")
        finally:
            sensor.set_mode(enforce=False, deny_unknown=False, guards=Guards(unseen_out=True))
            if dev is not None:
                sensor.remove_scope_dev(dev)
            drop_tmpfs(mnt)
        if denied == ("ran", 0):
            return SelftestResult(False, f"{self.name} self-test: the canary ran although "
                                  f"unknown: {self.NEVER_RAN}")
        if denied[0] != "eperm" or allowed != ("ran", 0):
            return SelftestResult(False, f"{self.name} self-test: canary unknown -> {denied}, "
                                  f"allowed -> {allowed}")
        wrong = [r.record.event.identity for r in seen if r.record.event.identity != ident]
        if len(seen) != 2 or wrong or not seen[0].eperm or seen[1].eperm:
            return SelftestResult(False, f"{self.name} self-test: kernel records {seen} do "
                                  f"not match the canary {ident} (struct offsets?)")
        return SelftestResult(True, f"{self.name}: canary denied with EPERM, then allowed; "
                              "kernel identity matches stat()")

    def enforcing(self) -> bool:
        return self.decider.store.current.snapshot.mode is Mode.ENFORCE

    def covers(self, identity: FileIdentity) -> bool:
        """The LSM hook judges files of this filesystem (some or all of them)."""
        return self._scope is not None and self._scope.covers(identity.dev)

    def start(self) -> None:
        sensor = self._open_sensor()
        # every filesystem the agent sees gets its class before anything is enforced
        self._scope = KernelScope(sensor, self.decider.store.current.snapshot)
        self._scope.start()
        self._scope.start_fuse_breaker(
            self.decider.store.current.snapshot.limits.decision_deadline_ms / 1000)
        sensor.exempt(os.getpid())  # after the self-test, whose canary must not be exempt
        enforce = self.enforcing()
        if enforce:
            self._start_feeder()
        sensor.set_mode(enforce=enforce, deny_unknown=enforce)
        self.tamper.start(sensor, self.decider.store.current.snapshot)
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-poll",
                                        daemon=True)
        self._thread.start()

    def _start_feeder(self) -> None:
        if not self.use_fanotify or self._feeder is not None:
            return
        feeder = _FanotifyFeeder(self)
        try:
            feeder.start()
        except (OSError, ExecguardError) as exc:  # no FAN_OPEN_EXEC_PERM: async fill only
            feeder.stop()
            self._n["fanotify"] = f"unavailable: {exc}"
            return
        self._feeder, self._n["fanotify"] = feeder, "on"

    def policy_changed(self, snapshot: PolicySnapshot) -> None:
        """A policy hook: re-arm the kernel. Every verdict decided under the old policy is
        dropped (the fanotify fill, or the poll thread, decides each file again at its next
        exec), and the mode and the scoped devices follow the new policy. The fanotify
        feeder's ignore marks go after the map is emptied, so a file whose exec raced the
        swap is at worst denied once as unverified, never allowed on an old verdict."""
        sensor = self._sensor
        if sensor is None:
            return
        enforce = snapshot.mode is Mode.ENFORCE
        if not snapshot.keeps_enforcing:
            self.tamper.apply(snapshot)  # unpinned before anything loosens
        if not enforce:
            sensor.set_mode(enforce=False, deny_unknown=False)  # loosen before anything else
        self._n["verdicts_dropped"] += self._kv.reset(sensor)
        with self._lock:
            self._held.clear()  # decisions held for records were made under the old policy
        self._recorded.clear()
        if self._scope is not None:
            self._scope.policy_changed(snapshot)
        if self._feeder is not None:
            self._feeder.policy_changed(snapshot)  # no ignore marks (new marks if scopes moved)
        elif enforce:
            self._start_feeder()  # monitor -> enforce: first-seen files are verified at open
        sensor.set_mode(enforce=enforce, deny_unknown=enforce)
        self.tamper.apply(snapshot)  # pinned once the new policy enforces
        self._n["policy_swaps"] += 1

    def fill(self, event: ExecEvent, fd: int) -> Optional[Decision]:
        """Verify a file the LSM covers and write its verdict before fanotify answers; the
        decision, or None when the LSM does not cover it (fanotify then enforces itself)."""
        if not self.covers(event.identity):
            return None
        event, in_scope = self._placed(event, fd)
        snapshot = self.decider.store.current.snapshot
        ident = self._identity(fd)
        known = self._sensor.verdict(ident)  # the kernel's own word on this version
        if known is True and snapshot.file_decides and not any(
                r.mode is Mode.MONITOR for r in snapshot.rules):
            # bprm_check will allow it from the map (an allow for the file, not a monitor
            # rule's would-deny, which must be recorded as such); the kernel's record says so
            return Decision(event, True, Reason.OK, "kernel verdict map hit", Enforcement.NONE,
                            Source.CACHE, policy_version=snapshot.version)
        for _attempt in range(3):  # a policy swap during the decision: decide again
            generation = self._kv.generation
            ident = self._identity(fd)  # the stamp of what is verified, taken before it
            # no allow in the kernel (never one, a write-open dropped it, or a close-write
            # verified new bytes to a denial): nothing keyed by identity is trusted, since a
            # write through a shared mapping can change the bytes under the same stamp, and
            # an older cache entry must never overrule the kernel's newer word
            decision = self.decider.decide(event, fd, self.enforcement, in_scope=in_scope,
                                           rehash=known is not True)
            allow = map_allows(decision, self.decider.store.current.snapshot.mode)
            if self._publish(fd, ident, allow, generation) or has_writers(fd):
                break
        with self._lock:
            if len(self._held) >= self.HELD_MAX:
                self._held.clear()  # execs that never reached the hook; their records go
            self._held[identity_key(ident)] = decision
        self._n["filled_by_fanotify"] += 1
        return decision

    def record_filled(self, decision: Decision) -> None:
        """Record a fill's decision now (the open was refused: no kernel record follows)."""
        with self._lock:  # held under the kernel's identity of the file (fill)
            for key in [k for k, held in self._held.items() if held is decision]:
                del self._held[key]
        self.record(decision)

    def _loop(self) -> None:
        pump(self._sensor, self._stop, self._handle, self._n, "errors", self.POLL_MS,
             heartbeat=self.heartbeat)

    def _handle(self, lrec: Any) -> None:
        """One kernel record: an exec, a mapping, or a refused mount or ptrace
        (agent/backends/records.py)."""
        self._n["records"] += 1
        self._n["kernel_denials"] += int(lrec.eperm)
        self._dispatch(lrec.record, lrec.eperm)

    def _handle_exec(self, rec: Any, eperm: bool) -> None:
        from agent.sensors.decode import KernelAction, KernelState

        event: ExecEvent = rec.event
        snapshot = self.decider.store.current.snapshot
        with self._lock:
            held = self._held.pop(identity_key(event.identity), None)
        if held is not None:  # fanotify decided this exec a moment ago
            event = dataclasses.replace(event, exe=held.event.exe)
            self.record(replace_decision(held, event=event))
            return
        if rec.state is KernelState.ALLOW:
            if rec.action is KernelAction.LAYER:
                self._record_kernel_hit(event, snapshot, LAYER_HIT)
            else:
                self._record_kernel_hit(event, snapshot)
            return
        # a denied exec never ran: /proc/PID/exe is the old one
        fd = self._exec_file(event)
        if fd is None:
            self._unreadable(rec, eperm, "exec")
            return
        decision = self._decide_and_remember(event, fd, snapshot)
        if eperm and decision.allow:  # denied as unknown; trusted now, so the next exec runs
            decision = replace_decision(decision, allow=False, reason=Reason.UNVERIFIED,
                                enforcement=self.enforcement,
                                detail="denied: not verified before its exec; verified "
                                f"since ({decision.detail}): the next exec runs")
        elif eperm:
            decision = replace_decision(decision, enforcement=self.enforcement)
        self.record(decision)

    def alive(self, max_silence_s: float) -> Optional[str]:
        """None while the ring poll loop (and the fanotify feeder, when on) turn."""
        if self._thread is None or not self._thread.is_alive():
            return "bpf-lsm ring poll thread not running"
        why = self._scope.alive() if self._scope is not None else None
        why = why or self.heartbeat.check(max_silence_s)
        if why is None and self._feeder is not None:
            why = self._feeder.alive(max_silence_s)
        return why

    def remember(self, path: str, identity: FileIdentity, allow: bool,
                 decided_under: Optional[PolicySnapshot] = None) -> None:
        """The pre-scan and close-after-write verdicts: into the map before the first exec.
        ``decided_under``: the policy the verdict came from; after a swap it is dropped."""
        generation = self._kv.generation  # first: a swap from here on makes the write fail
        snapshot = self.decider.store.current.snapshot
        if decided_under is not None and decided_under is not snapshot:
            return
        if not (self.covers(identity) and snapshot.in_scope(path)
                and not snapshot.caller_dependent):
            return
        self._publish_path(path, identity, allow, generation)

    def prescan_done(self, snapshot: PolicySnapshot, complete: bool) -> None:
        """The pre-scan finished (agent/prewarm.py): with every file of the scope verified,
        a mapping of a file without a verdict is denied from now on (kernel_scope)."""
        if self._scope is not None:
            self._scope.prescan_done(snapshot, complete)

    def _per_file_ok(self, snapshot: PolicySnapshot) -> bool:
        """A verdict decided for one exec may stand for the file: always, unless a rule
        depends on the caller and no fanotify fill re-decides each exec for its own caller
        (then it would let the next caller run unjudged; without it, such files stay
        unknown and enforce denies them: fail closed)."""
        return not snapshot.caller_dependent or self._feeder is not None

    def release(self) -> None:
        """An authorized stop: self-protection off and the pins gone, so ``stop`` takes the
        programs with it (without this, a keep-enforcing agent's programs outlive it)."""
        self.tamper.release()

    def stop(self) -> None:
        self._stop.set()
        if self._scope is not None:
            self._scope.stop()
        if self._feeder is not None:
            self._feeder.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sensor is not None:
            # the hook goes with it (nothing is denied any more) unless its links are
            # pinned: keep-enforcing without an authorized stop (``release``)
            self._sensor.close()

    def stats(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(self._n)
        if self._sensor is not None:
            out["sensor"] = self._sensor.stats().__dict__
        if self._scope is not None:
            out["scope"] = self._scope.stats()
        if self._feeder is not None:
            out["fanotify_stats"] = self._feeder.stats()
        out["tamper"] = self.tamper.stats(self.decider.store.current.snapshot)
        return out


class FmodRetRunner(LsmRunner):
    """fmod_ret on security_bprm_check: the BPF LSM backend's verdict map, logic and fanotify
    fill, through a tracing program, for kernels where bpf is not an active LSM."""

    ENFORCEMENT = Enforcement.FMOD_RET_DENY
    NEVER_RAN = "the fmod_ret program attached but never ran"

    def _new_sensor(self, config: Any) -> Any:
        from agent.sensors.bpf_fmod_ret import BpfFmodRetSensor

        return BpfFmodRetSensor(config)
