"""Cut off a FUSE filesystem in scope that stops answering the agent.

For every exec permission event the kernel opens the event's file inside the agent's
``read(2)`` of its fanotify group; on FUSE that open, and every stat and read of the file
after it, is a request to the filesystem's daemon, which may be any user's (the setuid
``fusermount3`` mounts for anyone, in a directory the user owns). A daemon that reads the
agent's request and never answers holds the thread that made it, and once the request has
been read the wait is uninterruptible: not even SIGKILL frees the thread (fs/fuse/dev.c,
``request_wait_answer``). Were that the event loop, every exec in scope would wait with
it, and the watchdog's SIGKILL would not help: the agent could not exit, so its group was
never released (measured: tests/integration/test_agent_fuse.py waited out its 60 s).

The one way out the kernel gives is aborting the connection (fusectl's
``/sys/fs/fuse/connections/N/abort``): every request on it fails, the agent's open fails
and the kernel denies that exec, and the filesystem answers nobody until it is mounted
again. So when, for longer than the limit, the loop has been silent, or an agent thread
has waited for a FUSE answer without running, or a decide worker has been busy without
running, every FUSE filesystem in scope with requests waiting is aborted. The limit is
shorter than the watchdog's (agent/sensors/fanotify_watchdog.py), so the abort comes
first. A legitimate FUSE filesystem in scope that keeps the agent waiting that long is cut
off too (docs/fanotify.md): keep slow network filesystems out of scope.

Nothing here takes the backend's lock or touches a FUSE file: it reads /proc and fusectl.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from agent.scope.mountinfo import unescape

CONNECTIONS = "/sys/fs/fuse/connections"
ADMIN_ACCESS = "/sys/module/fuse/parameters/allow_sys_admin_access"
WAIT_ANSWER = "request_wait_answer"  # fs/fuse/dev.c: waiting for the daemon's answer
TICK_MAX_S = 0.25
LIMIT_MAX_S = 5.0  # well inside systemd's watchdog window (WatchdogSec=20s: 10 s)
_ADMIN_LOCK = threading.Lock()  # admin_access() across every group's marks (a re-mark)
_admin_users = 0
_admin_before = ""


def limit_for(deadline_s: float) -> float:
    """Twice the decision deadline, at least 1 s, and never past 4 x the deadline (the
    fanotify watchdog kills a silent loop at 4 x deadline + 1 s) nor LIMIT_MAX_S (the
    service watchdog's window): by then it must be unstuck."""
    return min(max(1.0, 2 * deadline_s), 4 * deadline_s, LIMIT_MAX_S)


def in_fuse_wait(wchan: str) -> bool:
    """A thread blocked inside FUSE: waiting for an answer, or for a request slot."""
    return wchan == WAIT_ANSWER or wchan.startswith("fuse_")


def user_of(super_options: str) -> Optional[int]:
    """A FUSE filesystem's ``user_id=`` (its mounting user), None when it has none."""
    for opt in super_options.split(","):
        if opt.startswith("user_id="):
            try:
                return int(opt[len("user_id="):])
            except ValueError:
                return None
    return None


def connection_name(dev: int) -> str:
    """The fusectl directory of FUSE filesystem ``dev`` (its st_dev): the kernel's own
    dev_t (major << 20 | minor) in decimal."""
    return str((os.major(dev) << 20) | os.minor(dev))


@dataclass
class Waits:
    """How long each thread has been seen stuck: tid -> (CPU ns, since when)."""

    seen: Dict[int, Tuple[int, float]] = field(default_factory=dict)

    def update(self, now: float, stuck: Dict[int, int]) -> float:
        """``stuck``: tid -> CPU ns of the threads stuck now. Returns the longest stuck time
        (a thread that ran since the last look starts again)."""
        longest = 0.0
        kept: Dict[int, Tuple[int, float]] = {}
        for tid, cpu in stuck.items():
            before = self.seen.get(tid)
            since = before[1] if before is not None and before[0] == cpu else now
            kept[tid] = (cpu, since)
            longest = max(longest, now - since)
        self.seen = kept
        return longest


def to_cut(stuck_s: float, limit_s: float, waited: Dict[int, float]) -> List[int]:
    """The FUSE filesystems to abort after the agent was stuck ``stuck_s``: those that have
    had requests waiting, without a break, for as long (``waited``: dev -> seconds)."""
    if stuck_s <= limit_s:
        return []
    return [dev for dev, w in waited.items() if w > limit_s]


class Connections:
    """fusectl: found mounted, or mounted at /sys/fs/fuse/connections when nothing has (what
    systemd's sys-fs-fuse-connections.mount does at boot)."""

    def __init__(self, default: str = CONNECTIONS) -> None:
        self._default = default
        self.root: Optional[str] = None
        self.problem = ""

    def find(self) -> Optional[str]:
        # the one found before, while it is still a mount point (two stats: this runs for
        # every FUSE filesystem in scope at every tick); else the mount table again
        if self.root is not None and os.path.ismount(self.root):
            return self.root
        self.root = _fusectl_mount() or self._mount()
        return self.root

    def waiting(self, dev: int) -> Optional[int]:
        root = self.find()
        if root is None:
            return None
        try:
            with open(os.path.join(root, connection_name(dev), "waiting")) as fh:
                return int(fh.read().strip() or 0)
        except (OSError, ValueError):
            return None  # gone (unmounted), or not a FUSE connection after all

    def abort(self, dev: int) -> None:
        root = self.find()
        if root is None:
            raise OSError(f"no fusectl: {self.problem}")
        with open(os.path.join(root, connection_name(dev), "abort"), "w") as fh:
            fh.write("1")

    def _mount(self) -> Optional[str]:
        if not os.path.isdir(self._default):
            self.problem = f"{self._default} does not exist (no fuse module loaded)"
            return None
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"fusectl", self._default.encode(), b"fusectl", 0, None) != 0:
            e = ctypes.get_errno()
            self.problem = f"mount fusectl on {self._default}: {os.strerror(e)}"
            return None
        return self._default


@contextlib.contextmanager
def admin_access(param: str = ADMIN_ACCESS) -> Iterator[None]:
    """fuse's ``allow_sys_admin_access`` raised for the duration (the previous value back
    after). A user's FUSE mount without ``allow_other`` (what fusermount3 makes) refuses
    every other user, root too, so fanotify_mark's permission check refuses the agent's
    mark and execs there would never wait for it. The mark is checked once, when it is
    placed; everything the agent does there later is still refused (and so denied), so the
    window is only the mark call. OSError when the kernel has no such parameter (before
    6.0): the filesystem then stays unmarked, and says so."""
    global _admin_users, _admin_before
    with _ADMIN_LOCK:  # two groups mark at once during a re-mark: one raise, one restore
        if _admin_users == 0:
            with open(param) as fh:
                _admin_before = fh.read().strip()
            if _admin_before != "Y":
                with open(param, "w") as fh:
                    fh.write("Y")
        _admin_users += 1
    try:
        yield
    finally:
        with _ADMIN_LOCK:
            _admin_users -= 1
            if _admin_users == 0 and _admin_before != "Y":
                with open(param, "w") as fh:
                    fh.write(_admin_before or "N")


def say_cut(name: str, why: str) -> None:
    """A FUSE filesystem in scope stopped answering the agent and was aborted: on the
    console (the journal), and in status (``FuseBreaker.stats``)."""
    print(f"execguard: FUSE filesystem {name} cut off (its connection aborted): {why}; "
          "every exec waiting on it was denied", file=sys.stderr, flush=True)


class FuseBreaker:
    """Watches the agent's threads from its own thread and aborts what holds them.

    ``in_scope()`` -> {dev: name} of the FUSE filesystems marked or being marked (memory
    only, no lock: kept after an unmount, while the kernel may still hold their marks);
    ``forget(dev)`` drops one whose connection is gone; ``loop_silent()`` -> seconds since
    the event loop beat; ``busy_workers()`` -> tids of decide workers in the middle of a
    decision; ``on_cut(name, why)`` hears each abort."""

    def __init__(self, limit_s: float, in_scope: Callable[[], Dict[int, str]],
                 loop_silent: Callable[[], float], busy_workers: Callable[[], Iterable[int]],
                 on_cut: Optional[Callable[[str, str], None]] = None,
                 connections: Optional[Connections] = None,
                 forget: Optional[Callable[[int], None]] = None) -> None:
        self.limit_s = limit_s
        self._in_scope, self._loop_silent = in_scope, loop_silent
        self._busy_workers, self._on_cut, self._forget = busy_workers, on_cut, forget
        self._waiting_since: Dict[int, float] = {}  # dev -> since when requests wait
        self._conns = connections or Connections()
        self._fuse_waits, self._worker_waits = Waits(), Waits()
        self.aborted = 0
        self.errors = 0
        self.last = ""
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fanotify-fuse-breaker",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def is_connection(self, dev: int) -> bool:
        """``dev`` is a live FUSE connection (fusectl lists it)."""
        return self._conns.waiting(dev) is not None

    def stats(self) -> Dict[str, object]:
        return {"fuse_aborted": self.aborted, "fuse_abort_errors": self.errors,
                "fuse_last_aborted": self.last, "fuse_control": self._conns.root or
                self._conns.problem or "not needed yet"}

    def tick(self, now: float) -> List[str]:
        """One look; returns the names of the filesystems aborted."""
        fuse = self._in_scope()
        if not fuse:
            self._fuse_waits.seen.clear()
            self._worker_waits.seen.clear()
            self._waiting_since.clear()
            return []
        stuck, why = self._stuck(now)
        cut = to_cut(stuck, self.limit_s, self._waited(now, fuse))
        done = []
        for dev in cut:
            name = fuse[dev]
            try:
                self._conns.abort(dev)
            except OSError as exc:
                self.errors += 1
                self.last = f"{name}: abort failed: {exc}"
                continue
            self.aborted += 1
            self.last = f"{name}: {why} for {stuck:.1f}s"
            done.append(name)
            if self._on_cut is not None:
                self._on_cut(name, f"{why} for {stuck:.1f}s")
        return done

    def _waited(self, now: float, fuse: Dict[int, str]) -> Dict[int, float]:
        """dev -> how long its requests have been waiting without a break."""
        out: Dict[int, float] = {}
        for dev in fuse:
            n = self._conns.waiting(dev)
            if n is None and self._conns.root is not None and self._forget is not None:
                self._forget(dev)  # the connection is gone: nothing left to cut
            if not n:
                self._waiting_since.pop(dev, None)
                continue
            out[dev] = now - self._waiting_since.setdefault(dev, now)
        return out

    def _stuck(self, now: float) -> Tuple[float, str]:
        loop = self._loop_silent()
        fuse_threads: Dict[int, int] = {}
        workers: Dict[int, int] = {}
        busy = set(self._busy_workers())
        for tid in _threads():
            cpu = _cpu_ns(tid)
            if cpu is None:
                continue
            if in_fuse_wait(_wchan(tid)):
                fuse_threads[tid] = cpu
            if tid in busy:
                workers[tid] = cpu
        waits = [(loop, "the event loop silent"),
                 (self._fuse_waits.update(now, fuse_threads),
                  "an agent thread waiting for the filesystem's answer"),
                 (self._worker_waits.update(now, workers), "a decide worker not running")]
        return max(waits)

    def _run(self) -> None:
        every = min(TICK_MAX_S, self.limit_s / 4)
        while not self._stop.wait(every):
            try:
                self.tick(time.monotonic())
            except Exception as exc:  # counted; the breaker goes on
                self.errors += 1
                self.last = f"breaker: {type(exc).__name__}: {exc}"


def _fusectl_mount() -> Optional[str]:
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "fusectl":
                    return unescape(left.split(" ")[4])
    except OSError:
        pass
    return None


def _threads() -> List[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return []


def _wchan(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/wchan") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _cpu_ns(tid: int) -> Optional[int]:
    """The thread's time on a CPU (schedstat's first field), None when it is gone."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
