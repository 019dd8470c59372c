"""Enforcement backends behind one interface, each proven by a functional self-test.

A runner wraps a sensor (fanotify permission events, or the BCC exec sensor) and turns
what it sees into Decisions through the shared Decider. ``start_backend`` walks the
preference order from the chosen backend down, and a runner whose self-test fails is
skipped with its reason (ARCHITECTURE.md decision 5). The BPF LSM runner (issue 4) plugs
into the same ``Runner`` protocol.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Protocol, Set, Tuple

from agent.decide import Decider
from agent.decision import Decision, Enforcement, ExecEvent, FileIdentity, Source
from agent.errors import ExecguardError, Reason
from agent.heartbeat import Heartbeat
from agent.policy import Action, Mode, PolicySnapshot

Record = Callable[[Decision], None]
PREFERENCE = ("bpf-lsm", "fmod-ret", "fanotify-exec", "fanotify-open", "kill", "audit-only")
CANARIES = ("/usr/bin/true", "/bin/true")
RECORDED_MAX = 65536


@dataclass(frozen=True)
class SelftestResult:
    ok: bool
    detail: str


class Runner(Protocol):
    name: str
    enforcement: Enforcement  # what an enforced denial is

    def selftest(self) -> SelftestResult: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def remember(self, path: str, identity: FileIdentity, allow: bool) -> None: ...
    def policy_changed(self, snapshot: PolicySnapshot) -> None: ...
    def stats(self) -> Dict[str, Any]: ...


class BackendUnavailable(ExecguardError):
    pass


def private_tmpfs() -> str:
    """A tmpfs of our own: a self-test marks or scopes it and nothing else."""
    path = tempfile.mkdtemp(prefix="execguard-selftest-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "execguard-selftest",
                    path], check=True, capture_output=True, timeout=10)
    return path


def drop_tmpfs(path: str) -> None:
    subprocess.run(["umount", "-l", path], capture_output=True, timeout=10)
    shutil.rmtree(path, ignore_errors=True)


def canary_into(directory: str) -> str:
    src = next((c for c in CANARIES if os.path.isfile(c)), None)
    if src is None:
        raise BackendUnavailable(f"no canary binary ({', '.join(CANARIES)})")
    dst = os.path.join(directory, "canary")
    shutil.copy(src, dst)
    os.chmod(dst, 0o755)
    return dst


def run_canary(path: str) -> Tuple[str, int]:
    """('ran', rc) | ('eperm', 0) | ('killed', signal)."""
    try:
        proc = subprocess.run([path], capture_output=True, timeout=10)
    except PermissionError:
        return "eperm", 0
    if proc.returncode < 0:
        return "killed", -proc.returncode
    return "ran", proc.returncode


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
        # rules on the caller's uid/gid: an ignore mark would let every caller skip them
        self._per_file = not snapshot.caller_dependent
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

    def _decide(self, event: ExecEvent, fd: int) -> bool:
        decision = self.decider.decide(_with_exe(event), fd, self.enforcement)
        with self._lock:
            self._pending[id(event)] = (event, decision)
        return decision.allow or decision.enforcement is not self.enforcement

    def _observe(self, outcome: Any) -> None:
        from agent.sensors.fanotify_backend import Cause

        event = outcome.event
        with self._lock:
            held = self._pending.pop(id(event), None) if event is not None else None
        decision = held[1] if held is not None else None
        if outcome.cause is Cause.DECIDED and decision is not None:
            self.record(decision)
        elif outcome.cause is Cause.LATE and decision is not None:
            self.record(_replace(decision, extra={"late": True,
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

    def remember(self, path: str, identity: FileIdentity, allow: bool) -> None:
        """Nothing to do: the fanotify path consults the verdict cache at exec time."""

    def policy_changed(self, snapshot: PolicySnapshot) -> None:
        """A policy hook: files allowed under the old policy are asked again (their ignore
        marks would otherwise let them run past a revocation)."""
        if self._backend is not None:
            if (tuple(snapshot.scope_roots()) != self._scopes
                    or snapshot.caller_dependent == self._per_file):
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
        return beat.check(max_silence_s)

    def stop(self) -> None:
        if self._backend is not None:
            self._backend.stop()
        if self._watchdog is not None:
            self._watchdog.close()

    def stats(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(self._backend.stats()) if self._backend is not None else {}
        out["policy_swaps"] = self._swaps
        return out


def _with_exe(event: ExecEvent) -> ExecEvent:
    """At permission time /proc/PID/exe is still the exec'ing program: the audit subject."""
    try:
        return dataclasses.replace(event, exe=os.readlink(f"/proc/{event.pid}/exe"))
    except OSError:
        return event


def _replace(decision: Decision, **changes: Any) -> Decision:
    return Decision(**{**decision.__dict__, **changes})


def _map_allows(decision: Decision, mode: Mode) -> bool:
    """The kernel verdict map's entry: a denial by a monitor rule of an enforce policy is
    recorded, not blocked, so the kernel must let the file run too."""
    return decision.allow or (mode is Mode.ENFORCE and decision.enforcement is Enforcement.MONITOR)


class _KernelVerdicts:
    """A BCC runner's kernel verdict map across policy swaps. ``reset`` drops every verdict
    and starts a new generation; ``write`` stores a verdict only if no swap happened since
    the caller read ``generation`` (before deciding), so a decision made under the old
    policy never lands in the map after the swap emptied it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.generation = 0

    def write(self, sensor: Any, identity: FileIdentity, allow: bool, generation: int) -> bool:
        with self._lock:
            if generation != self.generation:
                return False
            sensor.set_verdict(identity, allow)
            return True

    def reset(self, sensor: Any) -> int:
        with self._lock:
            self.generation += 1
            return int(sensor.clear_verdicts())


def _whole_devices(snapshot: PolicySnapshot) -> Set[int]:
    """The devices the kernel enforces on: scope roots that are mount points (a tmpfs, a
    dedicated disk), never "/"."""
    return {os.stat(root).st_dev for root in snapshot.scope_roots()
            if root != "/" and os.path.ismount(root)}


def _rescope(sensor: Any, snapshot: PolicySnapshot) -> None:
    want = _whole_devices(snapshot)
    for dev in want - sensor.scope:
        sensor.add_scope_dev(dev)
    for dev in sensor.scope - want:
        sensor.remove_scope_dev(dev)


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
        self._kv = _KernelVerdicts()
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
            _rescope(sensor, self.decider.store.current.snapshot)
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
        fd = _open_exec_file(event)
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
            self._kv.write(self._sensor, event.identity, _map_allows(decision, snapshot.mode),
                           generation)
        if rec.action is KernelAction.KILLED:
            if decision.allow:  # killed as unknown; trusted now, so the next exec runs
                decision = _replace(decision, allow=False, reason=Reason.UNVERIFIED,
                                    enforcement=self.enforcement,
                                    detail="killed: not verified before its first exec; "
                                    f"verified since ({decision.detail}): the next exec runs")
            else:
                decision = _replace(decision, enforcement=self.enforcement)
        elif not decision.allow and decision.enforcement is self.enforcement and self.kill:
            try:  # outside the kernel's scope: the agent kills after verifying
                os.kill(event.pid, signal.SIGKILL)
                self._n["agent_kills"] += 1
                decision = _replace(decision, extra={"killed_by": "agent, after verification"})
            except ProcessLookupError:
                decision = _replace(decision, extra={"killed_by": "nobody: it had exited"})
        self.record(decision)

    def alive(self, max_silence_s: float) -> Optional[str]:
        """None while the ring poll loop turns (the service watchdog's proof), else why not."""
        if self._thread is None or not self._thread.is_alive():
            return f"{self.heartbeat.name} thread not running"
        return self.heartbeat.check(max_silence_s)

    def remember(self, path: str, identity: FileIdentity, allow: bool) -> None:
        snapshot = self.decider.store.current.snapshot
        if self._sensor is not None and self._kernel_judges(snapshot) and \
                snapshot.in_scope(path):
            self._kv.write(self._sensor, identity, allow, self._kv.generation)

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
            _rescope(sensor, snapshot)
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


def pump(sensor: Any, stop: threading.Event, handle: Callable[[Any], None],
         counts: Dict[str, Any], error_key: str, idle_ms: int, busy_ms: Optional[int] = None,
         busy_records: int = 0, heartbeat: Optional[Heartbeat] = None) -> None:
    """Poll a BCC sensor's ring until ``stop``; after a batch of ``busy_records`` or more the
    next poll waits only ``busy_ms`` (a storm drains faster than the ring fills). The
    heartbeat beats at every poll and after every record: progress, not mere life."""
    timeout = idle_ms
    while not stop.is_set():
        if heartbeat is not None:
            heartbeat.beat()
        try:
            records = sensor.poll(timeout)
        except Exception:  # a closed sensor at stop
            return
        for rec in records:
            try:
                handle(rec)
            except (OSError, ExecguardError):
                counts[error_key] += 1
            if heartbeat is not None:
                heartbeat.beat()
        timeout = busy_ms if busy_ms is not None and len(records) >= busy_records else idle_ms


def _open_exec_file(event: ExecEvent) -> Optional[int]:
    """The exec'd file: /proc/PID/exe while the process lives, else the path if it is still
    the same inode; None when neither is."""
    for path in (f"/proc/{event.pid}/exe", event.path):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (event.identity.dev, event.identity.ino):
            return fd
        os.close(fd)
    return None


class _FanotifyFeeder(FanotifyRunner):
    """FAN_OPEN_EXEC_PERM as the synchronous slow path of the BPF LSM backend: an unknown
    binary is verified while its exec waits at open, the verdict map is written, and only
    then is the open answered, so bprm_check_security (which runs later) finds the verdict.
    Files on devices outside the LSM scope are enforced by fanotify's own answer."""

    def __init__(self, lsm: LsmRunner) -> None:
        super().__init__("fanotify-exec", lsm.decider, lsm.record)
        self.lsm = lsm

    def _decide(self, event: ExecEvent, fd: int) -> bool:
        if self.lsm.fill(_with_exe(event), fd):
            return True  # the map holds the verdict: the LSM hook enforces it
        return super()._decide(event, fd)

    def _observe(self, outcome: Any) -> None:
        event = outcome.event
        if event is None or not self.lsm.covers(event.identity):
            super()._observe(outcome)  # the kernel's record reports execs the LSM covers


class LsmRunner:
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
        self._feeder: Optional[_FanotifyFeeder] = None
        self._held: Dict[Tuple[int, int, int, int], Decision] = {}
        self._recorded: Set[FileIdentity] = set()
        self._lock = threading.Lock()
        self._kv = _KernelVerdicts()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.heartbeat = Heartbeat(f"{name} ring poll")
        self._n: Dict[str, Any] = dict.fromkeys(
            ("records", "kernel_hits", "kernel_denials", "decided", "filled_by_fanotify",
             "vanished", "errors", "policy_swaps", "verdicts_dropped"), 0)
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
            ident = _identity(os.stat(canary))
            dev = ident.dev
            sensor.add_scope_dev(dev)
            sensor.set_mode(enforce=True, deny_unknown=True)
            denied = run_canary(canary)
            sensor.set_verdict(ident, True)
            allowed = run_canary(canary)
            seen = [r for r in sensor.poll(0) if r.record.event.path == canary]
        except (OSError, subprocess.SubprocessError, ExecguardError) as exc:
            return SelftestResult(False, f"{self.name} self-test failed: {exc}")
        finally:
            sensor.set_mode(enforce=False, deny_unknown=False)
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
        """The LSM hook judges this file: its device is in the kernel scope."""
        return self._sensor is not None and identity.dev in self._sensor.scope

    def start(self) -> None:
        sensor = self._open_sensor()
        # whole devices only: a scope root that is a mount point (a tmpfs, a dedicated disk)
        _rescope(sensor, self.decider.store.current.snapshot)
        enforce = self.enforcing()
        if enforce:
            self._start_feeder()
        sensor.set_mode(enforce=enforce, deny_unknown=enforce)
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
        if not enforce:
            sensor.set_mode(enforce=False, deny_unknown=False)  # loosen before anything else
        self._n["verdicts_dropped"] += self._kv.reset(sensor)
        with self._lock:
            self._held.clear()  # decisions held for records were made under the old policy
        self._recorded.clear()
        _rescope(sensor, snapshot)
        if self._feeder is not None:
            self._feeder.policy_changed(snapshot)  # no ignore marks (new marks if scopes moved)
        elif enforce:
            self._start_feeder()  # monitor -> enforce: first-seen files are verified at open
        sensor.set_mode(enforce=enforce, deny_unknown=enforce)
        self._n["policy_swaps"] += 1

    def fill(self, event: ExecEvent, fd: int) -> bool:
        """Verify a file the LSM covers and write its verdict before fanotify answers.
        False when the LSM does not cover it (fanotify then enforces itself)."""
        if not self.covers(event.identity):
            return False
        for _attempt in range(3):  # a policy swap during the decision: decide again
            generation = self._kv.generation
            ident = _identity(os.fstat(fd))  # the stamp of what is verified, taken before it
            decision = self.decider.decide(event, fd, self.enforcement)
            allow = _map_allows(decision, self.decider.store.current.snapshot.mode)
            if self._kv.write(self._sensor, ident, allow, generation):
                break
        with self._lock:
            if len(self._held) >= self.HELD_MAX:
                self._held.clear()  # execs that never reached the hook; their records go
            self._held[_key(ident)] = decision
        self._n["filled_by_fanotify"] += 1
        return True

    def _loop(self) -> None:
        pump(self._sensor, self._stop, self._handle, self._n, "errors", self.POLL_MS,
             heartbeat=self.heartbeat)

    def _handle(self, lrec: Any) -> None:
        from agent.sensors.decode import KernelState

        rec, eperm = lrec.record, lrec.eperm
        event: ExecEvent = rec.event
        self._n["records"] += 1
        self._n["kernel_denials"] += int(eperm)
        snapshot = self.decider.store.current.snapshot
        with self._lock:
            held = self._held.pop(_key(event.identity), None)
        if held is not None:  # fanotify decided this exec a moment ago
            self.record(_replace(held, event=dataclasses.replace(event, exe=held.event.exe)))
            return
        if rec.state is KernelState.ALLOW:
            # record the first exec of each file version (it may only have been pre-warmed),
            # then count: a decision line per cache hit would cost the agent more than the
            # exec costs the kernel
            self._n["kernel_hits"] += 1
            if event.identity not in self._recorded:
                if len(self._recorded) >= self.RECORDED_MAX:
                    self._recorded.clear()
                self._recorded.add(event.identity)
                self.record(Decision(event, True, Reason.OK, "kernel verdict map hit",
                                     Enforcement.NONE, Source.CACHE,
                                     policy_version=snapshot.version))
            return
        fd = _open_exec_file(event)  # a denied exec never ran: /proc/PID/exe is the old one
        if fd is None:
            self._n["vanished"] += 1
            self.record(Decision(event, not eperm, Reason.VERIFY_FAILED,
                                 "the file was gone before it could be verified",
                                 self.enforcement if eperm else Enforcement.NONE,
                                 Source.DEFAULT, policy_version=snapshot.version))
            return
        generation = self._kv.generation
        try:
            ident = _identity(os.fstat(fd))
            decision = self.decider.decide(event, fd, self.enforcement)
        finally:
            os.close(fd)
        self._n["decided"] += 1
        if self._per_file_ok(snapshot):
            self._kv.write(self._sensor, ident, _map_allows(decision, snapshot.mode),
                           generation)
        if eperm and decision.allow:  # denied as unknown; trusted now, so the next exec runs
            decision = _replace(decision, allow=False, reason=Reason.UNVERIFIED,
                                enforcement=self.enforcement,
                                detail="denied: not verified before its exec; verified "
                                f"since ({decision.detail}): the next exec runs")
        elif eperm:
            decision = _replace(decision, enforcement=self.enforcement)
        self.record(decision)

    def alive(self, max_silence_s: float) -> Optional[str]:
        """None while the ring poll loop (and the fanotify feeder, when on) turn."""
        if self._thread is None or not self._thread.is_alive():
            return "bpf-lsm ring poll thread not running"
        why = self.heartbeat.check(max_silence_s)
        if why is None and self._feeder is not None:
            why = self._feeder.alive(max_silence_s)
        return why

    def remember(self, path: str, identity: FileIdentity, allow: bool) -> None:
        """The pre-scan and close-after-write verdicts: into the map before the first exec."""
        snapshot = self.decider.store.current.snapshot
        if self.covers(identity) and snapshot.in_scope(path) and not snapshot.caller_dependent:
            self._kv.write(self._sensor, identity, allow, self._kv.generation)

    def _per_file_ok(self, snapshot: PolicySnapshot) -> bool:
        """A verdict decided for one exec may stand for the file: always, unless a rule
        depends on the caller and no fanotify fill re-decides each exec for its own caller
        (then it would let the next caller run unjudged; without it, such files stay
        unknown and enforce denies them: fail closed)."""
        return not snapshot.caller_dependent or self._feeder is not None

    def stop(self) -> None:
        self._stop.set()
        if self._feeder is not None:
            self._feeder.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sensor is not None:
            self._sensor.close()  # the hook goes with it: nothing is denied any more

    def stats(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(self._n)
        if self._sensor is not None:
            out["sensor"] = self._sensor.stats().__dict__
        if self._feeder is not None:
            out["fanotify_stats"] = self._feeder.stats()
        return out


class FmodRetRunner(LsmRunner):
    """fmod_ret on security_bprm_check: the BPF LSM backend's verdict map, logic and fanotify
    fill, through a tracing program, for kernels where bpf is not an active LSM."""

    ENFORCEMENT = Enforcement.FMOD_RET_DENY
    NEVER_RAN = "the fmod_ret program attached but never ran"

    def _new_sensor(self, config: Any) -> Any:
        from agent.sensors.bpf_fmod_ret import BpfFmodRetSensor

        return BpfFmodRetSensor(config)


def _identity(st: os.stat_result) -> FileIdentity:
    return FileIdentity(st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size)


def _key(identity: FileIdentity) -> Tuple[int, int, int, int]:
    return (identity.dev, identity.ino, identity.ctime_ns, identity.size)


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

    def remember(self, path: str, identity: FileIdentity, allow: bool) -> None:
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
