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
from typing import Any, Callable, Dict, Optional, Protocol, Tuple

from agent import registry
from agent.decision import Decision, Enforcement, ExecEvent, FileIdentity
from agent.errors import ExecguardError
from agent.policy import Mode, PolicySnapshot
from agent.service.heartbeat import Heartbeat

Record = Callable[[Decision], None]
PREFERENCE = registry.NAMES  # agent/registry.py: the one backend table
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

    def write(self, sensor: Any, identity: FileIdentity, allow: bool, generation: int,
              insert_only: bool = False) -> bool:
        with self._lock:
            if generation != self.generation:
                return False
            if insert_only:
                return bool(sensor.insert_verdict(identity, allow))
            sensor.set_verdict(identity, allow)
            return True

    def reset(self, sensor: Any) -> int:
        with self._lock:
            self.generation += 1
            return int(sensor.clear_verdicts())


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
            except Exception:  # a bug must cost one record, never the thread (fail-open)
                counts[error_key] += 1
                counts["handler_bugs"] = counts.get("handler_bugs", 0) + 1
            if heartbeat is not None:
                heartbeat.beat()
        timeout = busy_ms if busy_ms is not None and len(records) >= busy_records else idle_ms


def identity_of(st: os.stat_result) -> FileIdentity:
    return FileIdentity(st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns)


def identity_key(identity: FileIdentity) -> Tuple[int, int, int, int]:
    return (identity.dev, identity.ino, identity.ctime_ns, identity.size)


KeyOf = Callable[[int], Optional[Tuple[int, int]]]


def stat_key(fd: int) -> Optional[Tuple[int, int]]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _open_if(path: str, want: Tuple[int, int], key_of: KeyOf) -> Optional[int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None
    try:
        if key_of(fd) == want:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def open_exec_file(event: ExecEvent, key_of: KeyOf = stat_key) -> Optional[int]:
    """The exec'd file: /proc/PID/exe while the process lives, else the path if it is still
    the same inode; None when neither is. ``key_of`` gives (dev, ino) as the record has it
    (the kernel's view, which differs from stat() on an overlay: agent/scope)."""
    want = (event.identity.dev, event.identity.ino)
    for path in (f"/proc/{event.pid}/exe", event.path):
        fd = _open_if(path, want, key_of)
        if fd is not None:
            return fd
    return None


def open_mapped_file(event: ExecEvent, key_of: KeyOf = stat_key) -> Optional[int]:
    """The file a mapping record names: its parked path while it is still that inode, else
    one of the process's own mappings (/proc/PID/map_files, which needs CAP_SYS_ADMIN) that
    is that inode. /proc/PID/maps names an overlay file by the layer's device and inode, so
    every file mapping of the inode number is tried and compared with ``key_of``."""
    want = (event.identity.dev, event.identity.ino)
    candidates = [event.path] if event.path.startswith("/") else []
    try:
        with open(f"/proc/{event.pid}/maps", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[4].isdigit() and int(parts[4]) == want[1]:
                    candidates.append(f"/proc/{event.pid}/map_files/{parts[0]}")
    except (OSError, ValueError):
        pass
    for path in dict.fromkeys(candidates):
        fd = _open_if(path, want, key_of)
        if fd is not None:
            return fd
    return None
