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
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Protocol, Tuple

from agent.decide import Decider
from agent.decision import Decision, Enforcement, ExecEvent, FileIdentity, Source
from agent.errors import ExecguardError, Reason
from agent.policy import Action, Mode

Record = Callable[[Decision], None]
PREFERENCE = ("bpf-lsm", "fmod-ret", "fanotify-exec", "fanotify-open", "kill", "audit-only")
CANARIES = ("/usr/bin/true", "/bin/true")


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
        from agent.sensors.fanotify_backend import FanotifyBackend
        from agent.sensors.fanotify_watchdog import Watchdog

        snapshot = self.decider.store.current.snapshot
        deadline = snapshot.limits.decision_deadline_ms / 1000
        self._watchdog = Watchdog.spawn(stall_s=deadline)
        self._backend = FanotifyBackend(
            snapshot.scope_roots(), self._decide, deadline,
            snapshot.effective_on_timeout is Action.ALLOW, [self._watchdog.pid],
            observer=self._observe, heartbeat_fd=self._watchdog.heartbeat_fd, mask=self.mask)
        self._backend.start()

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

    def stop(self) -> None:
        if self._backend is not None:
            self._backend.stop()
        if self._watchdog is not None:
            self._watchdog.close()

    def stats(self) -> Dict[str, Any]:
        return dict(self._backend.stats()) if self._backend is not None else {}


def _with_exe(event: ExecEvent) -> ExecEvent:
    """At permission time /proc/PID/exe is still the exec'ing program: the audit subject."""
    try:
        return dataclasses.replace(event, exe=os.readlink(f"/proc/{event.pid}/exe"))
    except OSError:
        return event


def _replace(decision: Decision, **changes: Any) -> Decision:
    return Decision(**{**decision.__dict__, **changes})


class SensorRunner:
    """The BCC exec sensor: ``kill`` (SIGKILL before the first user instruction, for files on
    devices the policy scopes whole) or ``audit-only`` (decide and record, block nothing)."""

    POLL_MS = 100

    def __init__(self, name: str, decider: Decider, record: Record) -> None:
        self.name = name
        self.kill = name == "kill"
        self.enforcement = Enforcement.POST_EXEC_KILL if self.kill else Enforcement.AUDIT_ONLY
        self.decider = decider
        self.record = record
        self._sensor: Any = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._n: Dict[str, int] = dict.fromkeys(
            ("records", "kernel_hits", "decided", "agent_kills", "vanished", "read_errors"), 0)

    def _open_sensor(self) -> Any:
        if self._sensor is None:
            from agent.sensors.bpf_exec import BpfExecSensor

            self._sensor = BpfExecSensor()
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

    def start(self) -> None:
        sensor = self._open_sensor()
        if self.enforcing():
            # the kernel kills only on devices the policy covers whole: a scope root that is
            # a mount point; other scopes get the agent's own (later) kill
            for root in self.decider.store.current.snapshot.scope_roots():
                if os.path.ismount(root) and root != "/":
                    sensor.add_scope_dev(os.stat(root).st_dev)
            sensor.set_mode(kill=True, deny_unknown=True)
        else:
            sensor.set_mode(kill=False, deny_unknown=False)
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-poll", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                records = self._sensor.poll(self.POLL_MS)
            except Exception:  # a closed sensor at stop
                return
            for rec in records:
                try:
                    self._handle(rec)
                except (OSError, ExecguardError):
                    self._n["read_errors"] += 1

    def _handle(self, rec: Any) -> None:
        from agent.sensors.decode import KernelAction, KernelState

        self._n["records"] += 1
        if rec.read_error:
            self._n["read_errors"] += 1
            return
        event: ExecEvent = rec.event
        snapshot = self.decider.store.current.snapshot
        if rec.state is KernelState.ALLOW:
            self._n["kernel_hits"] += 1
            if snapshot.in_scope(event.path):
                self.record(Decision(event, True, Reason.OK, "kernel verdict map hit",
                                     Enforcement.NONE, Source.CACHE,
                                     policy_version=snapshot.version))
            return
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
        if snapshot.in_scope(event.path) and self.kill:
            self._sensor.set_verdict(event.identity, decision.allow)
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

    def remember(self, path: str, identity: FileIdentity, allow: bool) -> None:
        if self.kill and self._sensor is not None and \
                self.decider.store.current.snapshot.in_scope(path):
            self._sensor.set_verdict(identity, allow)

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


def make_runner(name: str, decider: Decider, record: Record) -> Runner:
    if name in ("fanotify-exec", "fanotify-open"):
        return FanotifyRunner(name, decider, record)
    if name in ("kill", "audit-only"):
        return SensorRunner(name, decider, record)
    raise BackendUnavailable(f"the {name} backend is not built yet (BPF LSM: issue 4)")


def start_backend(first: str, decider: Decider, record: Record,
                  on_skip: Callable[[str, str], None]) -> Tuple[Runner, SelftestResult]:
    """Start ``first`` or, when its self-test fails, the next one down the preference order."""
    for name in PREFERENCE[PREFERENCE.index(first):]:
        try:
            runner = make_runner(name, decider, record)
        except BackendUnavailable as exc:
            on_skip(name, str(exc))
            continue
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
