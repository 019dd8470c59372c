"""What every runner shares: the Runner protocol, the canary self-test helpers, the
kernel verdict map across policy swaps, and the ring poll loop."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Protocol, Set, Tuple

from agent.decision import Decision, Enforcement, ExecEvent, FileIdentity
from agent.errors import ExecguardError
from agent.policy import Mode, PolicySnapshot
from agent.service.heartbeat import Heartbeat

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
    def remember(self, path: str, identity: FileIdentity, allow: bool,
                 decided_under: Optional[PolicySnapshot] = None) -> None: ...
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


def with_exe(event: ExecEvent) -> ExecEvent:
    """At permission time /proc/PID/exe is still the exec'ing program: the audit subject."""
    try:
        return dataclasses.replace(event, exe=os.readlink(f"/proc/{event.pid}/exe"))
    except OSError:
        return event


def replace_decision(decision: Decision, **changes: Any) -> Decision:
    return Decision(**{**decision.__dict__, **changes})


def map_allows(decision: Decision, mode: Mode) -> bool:
    """The kernel verdict map's entry: a denial by a monitor rule of an enforce policy is
    recorded, not blocked, so the kernel must let the file run too."""
    return decision.allow or (mode is Mode.ENFORCE and decision.enforcement is Enforcement.MONITOR)


class KernelVerdicts:
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


def whole_devices(snapshot: PolicySnapshot) -> Set[int]:
    """The devices the kernel enforces on: scope roots that are mount points (a tmpfs, a
    dedicated disk), never "/"."""
    return {os.stat(root).st_dev for root in snapshot.scope_roots()
            if root != "/" and os.path.ismount(root)}


def rescope(sensor: Any, snapshot: PolicySnapshot) -> None:
    want = whole_devices(snapshot)
    for dev in want - sensor.scope:
        sensor.add_scope_dev(dev)
    for dev in sensor.scope - want:
        sensor.remove_scope_dev(dev)


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


def identity_of(st: os.stat_result) -> FileIdentity:
    return FileIdentity(st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size)


def identity_key(identity: FileIdentity) -> Tuple[int, int, int, int]:
    return (identity.dev, identity.ino, identity.ctime_ns, identity.size)


def open_exec_file(event: ExecEvent) -> Optional[int]:
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
