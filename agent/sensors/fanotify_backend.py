"""The fanotify permission backend: every exec of a file in scope waits for our answer.

The marks go on the filesystems that hold the scopes (agent/sensors/fanotify_marks.py), kept
current by a mount watcher, so an exec waits whatever mount or namespace it comes through.
One loop thread reads permission events and answers whatever it can at once: the agent's
own pid and the exempt pids first (the fapolicyd deadlock lesson: nothing, not even a lock
or a path lookup, comes before that check), then the agent's descendants, then files the
scope view places outside every scope (``ScopeTracker.place_fd``), then files whose answer
``lookup`` already holds in memory. Everything else goes to per-uid queues
(agent/sensors/fanotify_queue.py) served in turn by workers that call ``decide(event, fd)``
once per file version; the loop answers ``on_timeout`` for any event whose decision misses
the deadline. The kernel keeps an ignore mark through writes into a shared mapping, so one
is placed only on a write-guarded filesystem (tmpfs and the like: every open there reaches
the loop, and a write-open removes the inode's mark, and has the caller forget what it
remembered of the inode, before it is answered; agent/sensors/fanotify_writes.py).
Elsewhere every exec in scope is answered here, known allows from ``lookup`` on the loop.
The loop beats a heartbeat that a watchdog process watches (fanotify itself never times
out; see agent/sensors/fanotify_watchdog.py).

No thread of it dies of an error: an OSError reading the group (EMFILE, ENFILE, ENOMEM:
the kernel then denies the event it could not hand over) is counted and the reads pause
briefly; anything else is counted, the exec concerned is denied, and the thread goes on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import resource
import select
import subprocess
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from agent.decision import ExecEvent
from agent.scope import MountWatcher, ScopeTracker
from agent.scope.live import mount_id_of_fd
from agent.sensors import fanotify_scope as scope
from agent.sensors import fanotify_sys as fs
from agent.sensors.fanotify_fuse import FuseBreaker, limit_for
from agent.sensors.fanotify_marks import GUARDED, STAMPED, FsMarks
from agent.sensors.fanotify_model import (
    ALLOW_ONCE,
    Cause,
    Decide,
    Lookup,
    Observer,
    Outcome,
    Pending,
)
from agent.sensors.fanotify_progress import WorkerClock
from agent.sensors.fanotify_queue import FairQueue, Job
from agent.sensors.fanotify_writes import (
    WriteOpens,
    ignore_marks_hold,
    stamps_follow_writes,
)
from agent.service.heartbeat import Heartbeat
from agent.writers import has_writers, ignore_lease_signals

__all__ = ["Cause", "Decide", "FanotifyBackend", "Lookup", "Observer", "Outcome"]

NOTE_BACKLOG = 10000  # outcomes waiting for the observer before new ones are dropped
MAX_PENDING = 4096  # execs waiting for a decision (each holds an fd); past it: denied
MOUNTS_EVERY_S = 5.0  # the mount table is read again at least this often (a missed wake-up)
READ_BYTES = 4096  # one read: up to 170 events, then deadlines and beats again
READS_AFTER_ERROR = 64  # failed reads per turn: each still made the kernel deny one event
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.005, 0.1  # pause after errors, doubling while they last
BEAT_EVERY_S = 0.01  # heartbeats within a long batch of events, at most this often
POLL_FALLBACK_S = 0.01  # while poll(2) itself fails: read this often instead
GONE = (errno.EPIPE, errno.EBADF)  # the heartbeat pipe's reader is gone for good


class FanotifyBackend:
    """Answer exec permission events for the files of ``scopes``, on every filesystem the
    scope view puts (partly) in scope, whatever mount they are reached through.

    ``decide`` runs on a worker thread and must verify the file through ``fd`` (the exact
    file being executed), never by re-opening the path, and must never write to a watched
    mount. ``lookup``, when given, runs on the loop thread first and may answer from memory
    (True/False) or pass (None); it must never block, read a file or take a lock that
    decide() holds. ``observer`` gets every answer (and late results) on its own thread.
    The lock is never held across decide(), an open or anything else that can wait for
    a permission answer.

    ``share_answers`` (default: ``ignore_marks``): an answer stands for the file version,
    whoever execs it, so execs that wait for the same one get the answer decide() gave for
    the first. Without it each is decided for its own caller (one at a time, by one worker:
    the first verification fills the caller's cache for the rest). ``max_pending`` execs
    (``max_per_uid`` of one real uid) may wait for decisions; past that an exec gets the
    ``overload_allow`` answer at once (default deny: a flood must not open the door); so
    does an exec whose event cannot be read, or whose file is on a user's FUSE filesystem
    (nothing can be decided for it: monitor mode allows it, enforce mode denies it).

    ``on_write_open(dev, ino)``, on the loop, before a write-open of a file on a guarded
    filesystem is answered: forget what is remembered of that inode (memory only, like
    ``lookup``). ``write_opens`` counts them, ``write_proof(dev)`` says which filesystems
    are guarded (agent/sensors/fanotify_writes.py). The write-opens come from a second
    group, the write guard, read on its own thread (fanotify_marks.py says why);
    ``on_guard_lost()`` is called if that group ever has to be closed: from then on no
    filesystem is guarded, and whatever was remembered on the strength of the guard goes.
    """

    def __init__(
        self,
        scopes: Sequence[str],
        decide: Decide,
        deadline_s: float,
        on_timeout_allow: bool,
        exempt_pids: Iterable[int] = (),
        *,
        observer: Optional[Observer] = None,
        lookup: Optional[Lookup] = None,
        workers: int = 4,
        ignore_marks: bool = True,
        exempt_descendants: bool = True,
        heartbeat_fd: Optional[int] = None,
        mask: Optional[int] = None,
        share_answers: Optional[bool] = None,
        max_pending: int = MAX_PENDING,
        max_per_uid: Optional[int] = None,
        overload_allow: bool = False,
        mounts_every_s: float = MOUNTS_EVERY_S,
        on_write_open: Optional[Callable[[int, int], None]] = None,
        on_guard_lost: Optional[Callable[[], None]] = None,
        on_fuse_cut: Optional[Callable[[str, str], None]] = None,
    ) -> None:
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be positive, got {deadline_s}")
        self._tracker = ScopeTracker(scope.scope_dirs(scopes))
        self._decide, self._observer, self._lookup = decide, observer, lookup
        self._on_write_open, self._on_guard_lost = on_write_open, on_guard_lost
        self.write_opens = WriteOpens()
        self._deadline, self._on_timeout = float(deadline_s), bool(on_timeout_allow)
        self._exempt = set(exempt_pids)
        self._descendants, self._ignore_marks = exempt_descendants, ignore_marks
        self._share = ignore_marks if share_answers is None else share_answers
        self._overload_allow = overload_allow
        self._hb, self._want_mask, self._nworkers = heartbeat_fd, mask, max(1, workers)
        self._beat_s = max(0.01, min(self._deadline / 4, 0.5))
        self._pid = os.getpid()
        self._born = scope.parent_of(self._pid)[1]  # start time, to cut ancestry walks short
        self._group = -1
        self._mask = 0
        self._epoch = 0  # +1 per forget_allowed(): a verdict from before must not mark
        self.heartbeat = Heartbeat("fanotify")  # each loop turn: the service watchdog
        self._lock = threading.Lock()
        self._marks = FsMarks(lambda: self._group, self._lock)
        self._guard = -1  # the write guard's group (FAN_OPEN_PERM), -1 when there is none
        self._guard_marks = FsMarks(lambda: self._guard, self._lock, guard=True)
        self._guard_state = "off"
        # each turn of the guard's thread (its poll wakes every second): a guard that stops
        # turning holds every open of a guarded filesystem, so the service watchdog must
        # see it (FanotifyRunner.alive)
        self.guard_heartbeat = Heartbeat("fanotify write guard")
        self._mounts_every = mounts_every_s
        # a FUSE filesystem in scope whose daemon stops answering the agent's open of an
        # event's file (inside read(2)) or its reads would hold the loop or a worker for
        # ever, past any SIGKILL: it is aborted first (agent/sensors/fanotify_fuse.py)
        self._fuse = FuseBreaker(limit_for(self._deadline), self._marks.fuse_in_scope,
                                 self.heartbeat.silent_for, self._busy_worker_tids,
                                 on_cut=on_fuse_cut, forget=self._marks.forget_fuse)
        self._watcher: Optional[MountWatcher] = None
        # answered by nobody yet, in deadline order (insertion order: a fixed deadline)
        self._pending: Dict[int, Pending] = {}
        # handed to the workers and not decided yet (answered by on_timeout or not): the
        # service watchdog's proof that decisions, not only the loop, make progress
        self._undecided: Dict[int, Pending] = {}
        self._decided_at = time.monotonic()  # when a worker last finished a decision
        self._moved_at = self._decided_at  # when a busy worker was last seen using CPU
        self._clocks: List[WorkerClock] = []
        self.worker_tids: List[int] = []  # for diagnostics (the service verb) and tests
        self._per_uid_given = max_per_uid is not None
        per_uid = max_per_uid if max_per_uid is not None else _per_uid(max_pending)
        self._queue = FairQueue(max_pending, per_uid)
        self._notes: queue.SimpleQueue[Optional[Outcome]] = queue.SimpleQueue()
        self._threads: List[threading.Thread] = []
        self._stopping = False
        self._wake_r, self._wake_w = -1, -1
        self._state = "new"
        self._paused_until = 0.0  # reads wait until then after errors (the loop still turns)
        self._backoff = 0.0
        self._last_beat = 0.0
        self._last_error = ""
        self._n: Dict[str, int] = dict.fromkeys(
            [c.value for c in Cause]
            + ["events", "allowed", "denied", "placed_foreign", "placed_nameless"]
            + ["write_opens", "write_open_errors", "ignore_marks", "ignore_marks_removed"]
            + ["guard_events", "guard_errors"]
            + ["ignore_mark_errors"]
            + ["response_errors", "observer_errors", "observer_dropped", "heartbeat_errors"]
            + ["read_errors", "poll_errors", "loop_errors", "worker_errors", "stale_skipped"]
            + ["mount_refresh_errors", "max_latency_us"],
            0,
        )

    # -- public API -------------------------------------------------------------------
    @property
    def mask_name(self) -> str:
        return fs.MASK_NAMES.get(self._mask, "none")

    @property
    def backend_name(self) -> str:
        """The ExecEvent.backend value: fanotify-exec, or fanotify-open on old kernels."""
        return "fanotify-open" if self._mask == fs.FAN_OPEN_PERM else "fanotify-exec"

    @property
    def tracker(self) -> ScopeTracker:
        """The scope view the loop places events with (the decide side places with it too)."""
        return self._tracker

    def write_proof(self, dev: int) -> Optional[str]:
        """STAMPED, GUARDED or None for filesystem ``dev`` (a mount's device): what proves
        that a verdict keyed by a file's stamp still covers its bytes: every write changes
        the stamp there, or every write-open reaches a loop before it is answered (the
        exec group's own on old kernels, where it sees every open; else the guard's)."""
        if stamps_follow_writes(self._marks.fstype(dev)):
            return STAMPED
        return GUARDED if self._guarded(dev) else None

    def _guarded(self, dev: int) -> bool:
        # a closed guard guards nothing, whatever a round that raced its closing set
        return dev in self._marks.guarded or (self._guard >= 0
                                              and dev in self._guard_marks.guarded)

    def _ignorable(self, dev: int) -> bool:
        """An allowed file of filesystem ``dev`` may carry an ignore mark: every write-open
        there removes it first (fanotify_writes.py)."""
        return self._guarded(dev) and ignore_marks_hold(self._marks.fstype(dev))

    def exempt(self, pid: int) -> None:
        """Answer this pid's events with allow at once, from now on (e.g. a helper)."""
        self._exempt.add(pid)

    def start(self) -> None:
        """Create the group, mark the filesystems in scope, start the threads and the mount
        watcher. Raises OSError (the group is then closed)."""
        if self._state != "new":
            raise RuntimeError(f"FanotifyBackend.start() in state {self._state}")
        # CPython 3.10/3.11 (3.11.2 here) spawn children with vfork() while holding the GIL:
        # a child of the agent whose exec waits for our answer would then freeze the loop
        # thread forever. fork() costs a little more and cannot deadlock that way.
        if getattr(subprocess, "_USE_VFORK", False):
            setattr(subprocess, "_USE_VFORK", False)  # noqa: B010 (a Final in typeshed)
        ignore_lease_signals()  # has_writers() on the workers needs SIGIO ignored first
        self._fit_caps_to_fd_limit()
        # pre-content: asked before the write guard's content-class group (fanotify_marks.py)
        flags = fs.FAN_CLASS_PRE_CONTENT | fs.FAN_CLOEXEC | fs.FAN_NONBLOCK
        flags |= fs.FAN_UNLIMITED_QUEUE | fs.FAN_UNLIMITED_MARKS
        self._group = fs.fanotify_init(flags, fs.EVENT_F_FLAGS | os.O_CLOEXEC)
        self._wake_r, self._wake_w = os.pipe()
        self._state = "starting"
        # The breaker watches the marking too: a FUSE mount's mark call can wait for its
        # daemon while holding the lock every other thread needs. The loop's silence counts
        # from now; not a beat(): the loop's own first beat names its thread (the service
        # verb's diagnostics, and its tests' freezes).
        self.heartbeat.at = time.monotonic()
        self._fuse.start()
        masks = [self._want_mask] if self._want_mask else list(fs.MASK_NAMES)
        try:
            # Marks first, so the mask is known before any event is handled; an event that
            # arrives before the loop runs waits only until it starts, a moment later. Every
            # path lookup of the marking (an open of each mount point) comes before its
            # first mark: one that hangs leaves nothing waiting for a loop that never starts.
            self._tracker.refresh()
            self._mask = self._marks.start(self._tracker.view, self._tracker.mounts(), masks)
            if self._mask == fs.FAN_OPEN_EXEC_PERM:
                self._start_guard()
        except BaseException:
            self.stop()
            raise
        self._spawn(self._loop, "fanotify-loop")
        if self._guard >= 0:
            self._spawn(self._guard_loop, "fanotify-guard")
        for i in range(self._nworkers):
            self._spawn(self._worker, f"fanotify-decide-{i}")
        if self._observer is not None:
            self._spawn(self._notifier, "fanotify-notify")
        # from now on a mount anywhere in the agent's namespace is classified and, when in
        # scope, marked: the window is the watcher's wake-up and one round (docs/fanotify.md)
        self._watcher = MountWatcher(self._on_mounts, every_s=self._mounts_every)
        self._watcher.start()
        self._state = "running"

    def stop(self, join_s: float = 5.0) -> None:
        """Answer everything pending (on_timeout), close the group, end the threads."""
        if self._state in ("new", "stopped"):
            self._state = "stopped"
            return
        self._stopping = True
        if self._watcher is not None:
            self._watcher.stop()  # no new marks while the group goes
        os.write(self._wake_w, b"x")
        for t in self._threads:
            if t.name == "fanotify-loop":
                t.join(join_s)
        with self._lock:
            for p in list(self._pending.values()):
                self._answer(p, self._on_timeout, Cause.STOPPING)
            if self._group >= 0:
                os.close(self._group)
            self._group = -1
            if self._guard >= 0:  # the kernel allows the opens it still holds
                os.close(self._guard)
            self._guard = -1
        for p in self._queue.close():  # never taken: nobody else will close their fds
            with self._lock:
                p.done = True
                _close(p.fd)
        self._notes.put(None)
        for t in self._threads:
            if t.name != "fanotify-loop":
                t.join(join_s)  # a decide() stuck forever stays behind (daemon thread)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._fuse.stop()  # last: a stall while stopping must still be cut
        self._state = "stopped"

    def set_answers(self, on_timeout_allow: bool, overload_allow: bool) -> None:
        """The answers given without a decision, for a new policy (a switch between
        monitor and enforce keeps the group and its marks)."""
        self._on_timeout, self._overload_allow = bool(on_timeout_allow), bool(overload_allow)

    def forget_allowed(self) -> None:
        """Drop every ignore mark (a new policy: allowed files are asked again). A decision
        still running under the old policy answers its exec but leaves no mark behind."""
        with self._lock:
            self._epoch += 1
            if self._group >= 0:
                try:  # without MOUNT/FILESYSTEM: the inode marks only, ours all ignore marks
                    fs.fanotify_mark(self._group, fs.FAN_MARK_FLUSH, 0, fs.AT_FDCWD, None)
                except OSError:
                    self._n["ignore_mark_errors"] += 1

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            out: Dict[str, Any] = dict(self._n)
            out["pending"] = len(self._pending)
        out.update(self._queue.stats())
        out.update(max_pending=self._queue.max_pending, max_per_uid=self._queue.max_per_uid)
        out.update(state=self._state, mask=self.mask_name, backend=self.backend_name)
        out.update(self._marks.stats())
        guard = self._guard_marks.stats() if self._guard >= 0 else {}
        out["write_guard"] = dict(
            state=self._guard_state, marked=guard.get("marked", []),
            silent_s=round(self.guard_heartbeat.silent_for(), 3) if self._guard >= 0 else 0.0,
            mark_errors=guard.get("mark_errors", 0), last_error=guard.get("mark_last_error"),
            refused=guard.get("mark_fallbacks", {}))
        out["write_guarded_filesystems"] = len(self._marks.guarded | self._guard_marks.guarded)
        watcher = self._watcher
        out.update(scope_refreshes=self._tracker.refreshes,
                   mount_wakeups=watcher.wakeups if watcher is not None else 0,
                   mount_watch_errors=watcher.errors if watcher is not None else 0,
                   mount_watch="running" if watcher is not None and watcher.alive() else
                   "stopped", scope_partial=self._tracker.view.partial)
        out.update(self._fuse.stats())
        out["last_error"] = self._last_error
        return out

    def _fuse_owner(self, fd: int) -> Optional[int]:
        """The mounting user of the FUSE filesystem ``fd`` is on, when it is a user's (not
        root's) and marked through a mount of ours; from fdinfo, with no stat of the file
        (a user's FUSE filesystem refuses root's)."""
        if not self._marks.any_user_fuse():
            return None
        mid = mount_id_of_fd(fd)
        m = self._tracker.mount(mid) if mid is not None else None
        return self._marks.fuse_user(m.dev) if m is not None else None

    def _busy_worker_tids(self) -> List[int]:
        """The decide workers in the middle of a decision (for the FUSE breaker)."""
        return [c.tid for c in list(self._clocks) if c.busy_since is not None]

    def stalled_s(self) -> float:
        """How long execs have waited for the workers while none of them made progress
        (0.0 when none waits). Progress is a finished decision, or a busy worker whose
        thread used CPU since the last look (a slow verification moves; a deadlock, a read
        that never returns or a frozen thread does not). The loop answers on_timeout and
        keeps beating while every worker is stuck, so this is what shows that decisions
        stopped; agent/sensors/fanotify_progress.py has the rule."""
        now = time.monotonic()
        if any(clock.moved(now) for clock in list(self._clocks)):
            self._moved_at = now
        with self._lock:
            oldest = next(iter(self._undecided.values()), None)  # insertion order: oldest
            if oldest is None:
                return 0.0
            waited = now - oldest.t0 / 1e9
            return max(0.0, min(waited, now - max(self._decided_at, self._moved_at)))

    # -- marks ------------------------------------------------------------------------
    def _ignore(self, p: Pending, epoch: Optional[int] = None, mark: bool = True) -> bool:
        """Lock held. The ignore mark of an allowed exec on a write-guarded filesystem, then
        a re-check of the stamp: a change that raced the answer means the verdict covers
        other bytes (the mark goes again). Returns False when it changed. The kernel adds
        no ignore mark to an inode open for write, and every later write-open removes it
        on the loop first (_watch_writes): no mark outlives a change of the bytes.
        ``epoch``: the policy epoch the verdict was made in; a stale one adds no mark.
        ``mark`` False (an ``ALLOW_ONCE`` answer): only the re-check."""
        # markable was judged at the event's arrival; the guard may have gone since
        marked = (mark and p.markable and self._ignore_marks and self._group >= 0
                  and epoch in (None, self._epoch) and self._ignorable(p.event.identity.dev))
        if marked:
            try:
                fs.ignore_mark(self._group, self._mask, p.fd)
                self._n["ignore_marks"] += 1
            except OSError:
                self._n["ignore_mark_errors"] += 1
                marked = False
        ident = p.event.identity
        # the stamp proves nothing on a guarded filesystem (a write through a mapping
        # keeps it): a write-open counted since the event came in means other bytes
        if _unchanged(p) and (p.writes is None
                              or self.write_opens.count(ident.dev, ident.ino) == p.writes):
            return True
        if marked:
            self._unmark(p.fd)
        return False

    def _unmark(self, fd: int) -> bool:
        """Lock held. Remove the ignore mark of ``fd``'s inode; False when it had none."""
        if self._group < 0:
            return False
        try:
            fs.ignore_mark(self._group, self._mask, fd, add=False)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                self._n["ignore_mark_errors"] += 1
            return False
        return True

    def _on_mounts(self) -> None:
        """On the mount watcher's thread: classify the new table, mark what came into
        scope, unmark what left it. Never on the loop: a mount point's path lookup may wait
        on a stalled mount, and the loop must not."""
        try:
            self._tracker.refresh()
            self._marks.reconcile(self._tracker.view, self._tracker.mounts())
            if self._guard >= 0:
                self._guard_marks.reconcile(self._tracker.view, self._tracker.mounts())
        except Exception as exc:  # counted; the watcher goes on (and retries in seconds)
            self._failure("mount_refresh_errors", exc)

    # -- threads ----------------------------------------------------------------------
    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _fit_caps_to_fd_limit(self) -> None:
        """Each waiting exec holds an fd: keep the cap well inside the fd limit, so the cap,
        not EMFILE, is what a flood meets first."""
        try:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (OSError, ValueError):
            return
        if soft == resource.RLIM_INFINITY:
            return
        q = self._queue
        q.max_pending = min(q.max_pending, max(16, soft // 2))
        q.max_per_uid = min(q.max_per_uid if self._per_uid_given else _per_uid(q.max_pending),
                            q.max_pending)

    def _loop(self) -> None:
        both, wake_only = select.poll(), select.poll()
        both.register(self._group, select.POLLIN)
        both.register(self._wake_r, select.POLLIN)
        wake_only.register(self._wake_r, select.POLLIN)
        while not self._stopping:
            try:
                self._turn(both, wake_only)
            except Exception as exc:  # last resort: counted; the loop never dies of it
                self._failure("loop_errors", exc)
                time.sleep(self._next_backoff())
        if self._state.startswith("failed"):
            with self._lock:  # fail open: closing the group makes the kernel allow
                for p in list(self._pending.values()):
                    self._answer(p, self._on_timeout, Cause.STOPPING)
                os.close(self._group)
                self._group = -1

    def _turn(self, both: select.poll, wake_only: select.poll) -> None:
        now = time.monotonic()
        paused = now < self._paused_until
        try:
            ready = (wake_only if paused else both).poll(self._timeout_ms(now))
        except OSError as exc:
            # EINVAL: more fds polled than RLIMIT_NOFILE allows (someone lowered it to
            # nothing); ENOMEM. The group fd is non-blocking: try a read after a short wait
            self._failure("poll_errors", exc)
            time.sleep(POLL_FALLBACK_S)
            ready = [(self._group, select.POLLIN)]
        self._alive(force=True)
        if not paused and any(fd == self._group for fd, _ in ready):
            self._drain()
        self._expire()

    def _timeout_ms(self, now: float) -> int:
        wait = self._beat_s
        if self._paused_until > now:
            wait = min(wait, self._paused_until - now)
        with self._lock:
            first = next(iter(self._pending.values()), None)  # the earliest deadline
        if first is not None:
            wait = min(wait, first.deadline - now)
        return max(0, int(wait * 1000) + 1)

    def _alive(self, force: bool = False) -> None:
        """Beat the service heartbeat and the watchdog's pipe: every turn, and within a long
        batch of events at most every BEAT_EVERY_S (progress, not only turns)."""
        now = time.monotonic()
        if not force and now - self._last_beat < BEAT_EVERY_S:
            return
        self._last_beat = now
        self.heartbeat.beat()
        if self._hb is None:
            return
        try:
            os.write(self._hb, b".")
        except BlockingIOError:
            pass  # the watchdog has not read yet: it has beats enough
        except OSError as exc:
            self._n["heartbeat_errors"] += 1
            if exc.errno in GONE:
                self._hb = None  # watchdog gone; the daemon sees heartbeat_errors in stats

    def _drain(self) -> None:
        """One batch of events per turn, so a storm still gets beats and deadlines in
        between. A failed read is retried a few times at once (each one made the kernel
        deny the event it could not hand over, e.g. on EMFILE), then reads pause."""
        for _ in range(READS_AFTER_ERROR):
            try:
                buf = os.read(self._group, READ_BYTES)
            except BlockingIOError:
                self._backoff = 0.0
                return
            except OSError as exc:
                self._failure("read_errors", exc)
                continue
            self._backoff = 0.0
            self._batch(buf)
            return
        self._paused_until = time.monotonic() + self._next_backoff()

    def _batch(self, buf: bytes) -> None:
        events, error = fs.parse_events(buf)
        for ev in events:
            self._handle(ev)
            self._alive()
            self._expire_due()
        if error:
            # Unreadable records cannot be answered; only closing the group frees their
            # processes (the kernel allows them). Fail open, loudly, in stats()["state"].
            self._state = f"failed: {error}"
            self._stopping = True

    def _handle(self, ev: fs.Event) -> None:
        t0 = time.monotonic_ns()
        if ev.fd < 0:  # FAN_Q_OVERFLOW; permission events are never dropped
            return
        self._n["events"] += 1
        if ev.pid == self._pid or ev.pid in self._exempt:  # first: the fapolicyd lesson
            self._quick(ev, True, Cause.EXEMPT, "", t0)
            return
        if ev.mask & fs.FAN_OPEN_PERM:  # an open on a guarded filesystem (on old kernels,
            opened = self._watch_writes(ev)  # every open): a write-open forgets first
            if self._mask != fs.FAN_OPEN_PERM:  # not an exec: nothing more to decide
                self._quick(ev, True, Cause.OPENED, "", t0, opened, note=False)
                return
        path = ""
        try:
            path = os.readlink(f"/proc/self/fd/{ev.fd}")
            if self._descendants and scope.descends_from(ev.pid, self._pid, self._born):
                self._quick(ev, True, Cause.EXEMPT, path, t0)
                return
            # Where the file is: its mount (fdinfo), the directory of its filesystem that
            # mount shows, the scope view. A mount of another namespace is looked up in the
            # caller's own table; one nobody's table names (open_tree), or a file without a
            # name, is in scope.
            owner = self._fuse_owner(ev.fd)
            if owner:  # before any stat or read of it (docs/fanotify.md, "FUSE")
                self._quick(ev, self._overload_allow, Cause.ERROR, path, t0,
                            f"on a FUSE filesystem of user {owner}: its daemon can show the "
                            "agent other bytes than the exec runs; denied unread",
                            event=_unread(ev.pid, path, self.backend_name))
                return
            place = self._tracker.place_fd(ev.fd, path, ev.pid)
            if not place.in_scope:  # a PARTIAL filesystem's file outside its scope dirs
                self._quick(ev, True, Cause.OUT_OF_SCOPE, path, t0)
                return
            markable = place.fs_path is not None and self._ignorable(place.dev)
            st = os.fstat(ev.fd)
            if self._mask == fs.FAN_OPEN_PERM and not scope.is_executable(st.st_mode):
                self._quick(ev, True, Cause.NOT_EXECUTABLE, path, t0)
                return
            if place.fs_path is None:  # judged whatever its path says (docs/threat-model.md)
                nameless = st.st_nlink == 0 or path.endswith(" (deleted)")
                self._n["placed_nameless" if nameless else "placed_foreign"] += 1
            event = scope.exec_event(ev.pid, place.path, st, self.backend_name)
        except Exception as exc:  # EMFILE on a /proc read, or a bug: deny (monitor: allow)
            if not isinstance(exc, OSError):
                self._failure("loop_errors", exc)
            self._quick(ev, self._overload_allow, Cause.ERROR, path, t0,
                        f"cannot read the event: {exc}",
                        event=_unread(ev.pid, path, self.backend_name))
            return
        # the write-open count before anything reads the bytes or the memo (_ignore)
        writes = self.write_opens.count(st.st_dev, st.st_ino)
        self._hand_off(Pending(ev.fd, event, t0, t0 / 1e9 + self._deadline, markable, writes))

    def _watch_writes(self, ev: fs.Event) -> str:
        """An open, answered after this: when it is an open for write (its write access
        is counted before the event: a read lease on our fd is refused), the inode's
        ignore mark goes, its write-opens count grows and the caller forgets it, so no
        allow outlives bytes written through a mapping of this open. A lease check is two
        fcntl calls that never wait; a failed one counts as a write-open (forgetting is
        always safe)."""
        if not has_writers(ev.fd):
            return ""
        try:
            st = os.fstat(ev.fd)
        except OSError as exc:  # cannot be: our own open fd; the mark goes all the same
            self._failure("write_open_errors", exc)
            with self._lock:
                self._n["ignore_marks_removed"] += int(self._unmark(ev.fd))
            return "open for write"
        # One step under the lock, in this order, against the loop (which reads the count,
        # then the memo, and marks under the lock, then compares the count: _ignore): the
        # memo forgets first, so a hit after this is impossible and a hit before it is
        # followed by a count that moved; a mark placed before it goes here.
        with self._lock:
            self._n["write_opens"] += 1
            if self._on_write_open is not None:
                try:
                    self._on_write_open(st.st_dev, st.st_ino)
                except Exception as exc:  # the caller's bug: counted, the open answered
                    self._failure("write_open_errors", exc)
            self.write_opens.seen(st.st_dev, st.st_ino)
            self._n["ignore_marks_removed"] += int(self._unmark(ev.fd))
        return "open for write"

    # -- the write guard -------------------------------------------------------------
    def _start_guard(self) -> None:
        """The write guard's group and marks (fanotify_marks.py). Without it (a kernel or
        an LSM refuses it) nothing is guarded: verdicts on tmpfs and the like are then
        never kept (write_proof), which costs time, never safety."""
        flags = fs.FAN_CLASS_CONTENT | fs.FAN_CLOEXEC | fs.FAN_NONBLOCK
        flags |= fs.FAN_UNLIMITED_QUEUE | fs.FAN_UNLIMITED_MARKS
        try:
            self._guard = fs.fanotify_init(flags, fs.EVENT_F_FLAGS | os.O_CLOEXEC)
            self._guard_marks.start_guard(self._tracker.view, self._tracker.mounts())
        except OSError as exc:
            self._close_guard(f"failed: {exc}")
            return
        self._guard_state = "running"

    def _close_guard(self, state: str) -> None:
        """Close the guard's group (the kernel allows every open it holds): nothing is
        guarded from now on, and nothing kept on the strength of the guard stays."""
        with self._lock:
            if self._guard >= 0:
                os.close(self._guard)
            self._guard = -1
            self._guard_marks.guarded = frozenset()
        self._guard_state = state
        self._forget_everything_guarded()

    def _guard_loop(self) -> None:
        """Answer the guard's open events: each one allowed, after _watch_writes. Nothing
        here waits on anything but the kernel's own open of the event's file (a file of a
        guarded filesystem, never an overlay's: no event of ours can come of it)."""
        poller = select.poll()
        poller.register(self._guard, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping and self._guard >= 0:
            self.guard_heartbeat.beat()
            try:
                if not any(fd == self._guard for fd, _ in poller.poll(1000)):
                    continue
                buf = os.read(self._guard, READ_BYTES)
            except BlockingIOError:
                continue
            except OSError as exc:  # EMFILE: the kernel refused the open it could not hand
                self._failure("guard_errors", exc)  # over; a short pause, then again
                time.sleep(BACKOFF_MAX_S)
                continue
            events, error = fs.parse_events(buf)
            for ev in events:
                self._guard_event(ev)
            if error:  # unreadable records cannot be answered: only closing frees them
                self._close_guard(f"failed: {error}")

    def _guard_event(self, ev: fs.Event) -> None:
        if ev.fd < 0:  # FAN_Q_OVERFLOW: never for permission events
            return
        try:
            if ev.pid != self._pid and ev.pid not in self._exempt:
                self._watch_writes(ev)
        except Exception as exc:  # a bug: counted; the open is still answered
            self._failure("guard_errors", exc)
            self._forget_everything_guarded()
        with self._lock:
            self._n["guard_events"] += 1
            if self._guard >= 0:
                try:
                    fs.respond(self._guard, ev.fd, True)
                except OSError:
                    self._n["response_errors"] += 1
        _close(ev.fd)

    def _forget_everything_guarded(self) -> None:
        """A write-open may have gone by unseen: nothing kept on the guard's word stands."""
        self.forget_allowed()
        if self._on_guard_lost is not None:
            try:
                self._on_guard_lost()
            except Exception as exc:
                self._failure("guard_errors", exc)

    def _hand_off(self, p: Pending) -> None:
        """Answer from memory, or queue for a worker, or deny over the cap. Whatever goes
        wrong here, the exec is answered (denied) rather than left waiting."""
        queued = False
        try:
            if self._cached(p):
                return
            with self._lock:
                self._pending[id(p)] = p
                self._undecided[id(p)] = p
            queued = self._queue.offer(p)
            if not queued:
                self._refuse(p, Cause.OVERLOAD, self._overload_allow,
                             f"over the cap of execs waiting for a decision "
                             f"({self._queue.max_pending}, {self._queue.max_per_uid} per uid)")
        except Exception as exc:
            self._failure("loop_errors", exc)
            if not queued and not p.answered:
                self._refuse(p, Cause.ERROR, False, f"cannot hand the event over: {exc}")

    def _refuse(self, p: Pending, cause: Cause, allow: bool, detail: str) -> None:
        """Answer ``p`` on the loop, not decided; its fd is closed."""
        with self._lock:
            self._undecided.pop(id(p), None)
            p.done = True
            self._answer(p, allow, cause)
        self._note(self._outcome(p, cause, allow, detail))

    def _cached(self, p: Pending) -> bool:
        """Answer from the caller's memory on the loop thread: no worker hand-off, so a
        flood of unknown files never delays it. On a write-guarded filesystem the allow
        leaves an ignore mark too, added here: the kernel refuses it while the inode is
        open for write, and the next write-open removes it before it is answered."""
        lookup = self._lookup
        if lookup is None:
            return False
        epoch = self._epoch  # a policy swap after this look leaves no mark from it
        try:
            verdict = lookup(p.event)
        except Exception:
            return False  # the worker path decides instead
        if verdict is None:
            return False
        allowed, cause = bool(verdict), Cause.CACHED
        with self._lock:
            # the remembered answer must be for these bytes (a mark goes on first, then
            # the stamp is checked, so a change in between takes the mark off again)
            if allowed and not self._ignore(p, epoch):
                allowed, cause = False, Cause.CHANGED
            p.done = True
            self._answer(p, allowed, cause)
        self._note(self._outcome(p, cause, allowed))
        return True

    def _quick(
        self, ev: fs.Event, allow: bool, cause: Cause, path: str, t0: int, detail: str = "",
        note: bool = True, event: Optional[ExecEvent] = None,
    ) -> None:
        """Answer on the loop; ``note`` False: counted only (a plain open: no observer);
        ``event``: what is known of the exec, for its record."""
        with self._lock:
            self._respond(ev.fd, allow)
            self._count(allow, cause, t0)
        _close(ev.fd)
        if note:
            self._note(Outcome(cause, allow, ev.pid, path, event, _us(t0), detail))

    def _expire_due(self) -> None:
        """Within a batch: expire only when the earliest deadline has passed (cheap)."""
        with self._lock:
            first = next(iter(self._pending.values()), None)
        if first is not None and first.deadline <= time.monotonic():
            self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        late: List[Pending] = []
        with self._lock:
            for p in self._pending.values():  # deadline order: stop at the first not due
                if p.deadline > now:
                    break
                late.append(p)
            late = [p for p in late if self._answer(p, self._on_timeout, Cause.TIMEOUT)]
        for p in late:
            self._note(self._outcome(p, Cause.TIMEOUT, self._on_timeout))

    def _worker(self) -> None:
        clock = WorkerClock()
        with self._lock:
            self.worker_tids.append(clock.tid)
            self._clocks.append(clock)
        while True:
            try:
                work = self._queue.take()
            except Exception as exc:  # last resort, as in the loop
                self._failure("worker_errors", exc)
                time.sleep(BACKOFF_MAX_S)
                continue
            if work is None:
                return
            try:
                self._run(work, clock)
            except Exception as exc:  # a bug here must not cost a worker: deny its execs
                self._failure("worker_errors", exc)
                self._abandon(work)
            finally:
                clock.end()

    def _run(self, job: Job, clock: WorkerClock) -> None:
        unheard = self._queue.finish_if_unheard(job)
        if unheard is not None:
            # every exec already got the deadline's answer while this waited in the queue:
            # under a flood, deciding for nobody would only make the next execs late too
            self._n["stale_skipped"] += 1
            self._settle_unheard(unheard)
            return
        leader = job.waiters[0]
        epoch = self._epoch
        clock.begin()
        allowed, mark, detail = self._call_decide(leader)
        clock.end()
        waiters = self._queue.finish(job)
        if self._share:
            for p in waiters[1:]:  # before the leader's outcome: its record is the source
                self._settle(p, allowed, False, detail, epoch, leader)
            self._settle(leader, allowed, mark, detail, epoch)
            return
        self._settle(leader, allowed, mark, detail, epoch)
        for p in waiters[1:]:  # decided for their own callers; the verdict is cached now
            if p.answered:  # the deadline answered it meanwhile: nobody waits
                self._settle_unheard([p])
                continue
            epoch = self._epoch
            clock.begin()
            allowed, mark, detail = self._call_decide(p)
            clock.end()
            self._settle(p, allowed, mark, detail, epoch)

    def _call_decide(self, p: Pending) -> Tuple[bool, bool, str]:
        """(allowed, may mark, error detail): an exception in decide() denies."""
        try:
            answer = self._decide(p.event, p.fd)
        except Exception as e:  # a verifier bug must not kill the worker: deny
            return False, False, f"decide raised {type(e).__name__}: {e}"
        return bool(answer), answer is not ALLOW_ONCE, ""

    def _settle(self, p: Pending, allowed: bool, mark: bool, detail: str, epoch: int,
                leader: Optional[Pending] = None) -> None:
        """Answer ``p`` with a decision (``leader``: made for that other exec of the same
        file version), unless its deadline answered it first; then its fd is closed."""
        cause: Optional[Cause]
        with self._lock:
            p.done = True
            self._undecided.pop(id(p), None)
            self._decided_at = time.monotonic()
            if p.answered:  # the loop already gave the on_timeout answer
                cause = None
                if leader is None:  # the result still counts, for the next exec
                    if allowed and not detail:
                        self._ignore(p, epoch, mark)
                    self._n[Cause.LATE.value] += 1
                    cause = Cause.LATE
                _close(p.fd)
            else:
                cause = Cause.ERROR if detail else (Cause.SHARED if leader else Cause.DECIDED)
                if allowed and not detail and not self._ignore(p, epoch, mark):
                    # changed while it was decided (a write before the exec write-protects
                    # it): the verdict covered other bytes
                    allowed, cause = False, Cause.CHANGED
                self._answer(p, allowed, cause)
        if cause is not None:
            self._note(self._outcome(p, cause, allowed, detail, leader))

    def _settle_unheard(self, waiters: List[Pending]) -> None:
        """Execs already answered by their deadline whose decision nobody will make or
        hear: their fds close."""
        with self._lock:
            for p in waiters:
                p.done = True
                self._undecided.pop(id(p), None)
                _close(p.fd)

    def _abandon(self, work: Job) -> None:
        """After an unexpected error on a worker: deny what still waits, close the fds."""
        waiters = self._queue.finish(work)
        with self._lock:
            for p in waiters:
                if p.done and p.answered:
                    continue  # already settled and closed
                self._undecided.pop(id(p), None)
                p.done = True
                if p.answered:
                    _close(p.fd)
                else:
                    self._answer(p, False, Cause.ERROR)

    def _notifier(self) -> None:
        assert self._observer is not None
        while True:
            o = self._notes.get()
            if o is None:
                return
            try:
                self._observer(o)
            except Exception:
                self._n["observer_errors"] += 1

    # -- helpers (callers hold the lock where noted) -------------------------------------
    def _answer(self, p: Pending, allow: bool, cause: Cause) -> bool:
        """Lock held. Answer once; close the fd once decide() no longer reads it."""
        if p.answered:
            return False
        p.answered = True
        self._pending.pop(id(p), None)
        self._respond(p.fd, allow)
        self._count(allow, cause, p.t0)
        if p.done:
            _close(p.fd)
        return True

    def _respond(self, fd: int, allow: bool) -> None:
        """Lock held, so the group fd cannot be closed (and its number reused) meanwhile."""
        if self._group < 0:
            return  # stopped: closing the group already let the kernel allow the event
        try:
            fs.respond(self._group, fd, allow)
        except OSError:
            self._n["response_errors"] += 1

    def _count(self, allow: bool, cause: Cause, t0: int) -> None:
        self._n["allowed" if allow else "denied"] += 1
        self._n[cause.value] += 1
        self._n["max_latency_us"] = max(self._n["max_latency_us"], _us(t0))

    def _failure(self, kind: str, exc: BaseException) -> None:
        self._n[kind] += 1
        self._last_error = f"{kind}: {type(exc).__name__}: {exc}"

    def _next_backoff(self) -> float:
        self._backoff = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, self._backoff * 2))
        return self._backoff

    def _outcome(self, p: Pending, cause: Cause, allowed: bool, detail: str = "",
                 leader: Optional[Pending] = None) -> Outcome:
        ev = p.event
        return Outcome(cause, allowed, ev.pid, ev.path, ev, _us(p.t0), detail,
                       leader.event if leader is not None else None)

    def _note(self, o: Outcome) -> None:
        if self._observer is None:
            return
        if self._notes.qsize() >= NOTE_BACKLOG:  # a stuck observer costs records, not RAM
            self._n["observer_dropped"] += 1
            return
        self._notes.put(o)


def _per_uid(max_pending: int) -> int:
    """One uid may hold a quarter of the waiting execs (at least 8): the rest stays free
    for everybody else during its flood."""
    return max(8, max_pending // 4)


def _unread(pid: int, path: str, backend: str) -> Optional[ExecEvent]:
    """The event of an exec whose file could not be read (a stat refused: a user's FUSE
    mount refuses root), so that its denial is on record; None when /proc has no more."""
    if not path:
        return None
    try:
        return scope.exec_event(pid, path, None, backend)
    except Exception:
        return None


def _unchanged(p: Pending) -> bool:
    """The file still has the identity its exec started with (an fstat error: no)."""
    try:
        return scope.file_identity(os.fstat(p.fd)) == p.event.identity
    except OSError:
        return False


def _close(fd: int) -> None:
    # EINTR still closes it on Linux; EBADF would be a bug, not worth a dead thread
    with contextlib.suppress(OSError):
        os.close(fd)


def _us(t0: int) -> int:
    return (time.monotonic_ns() - t0) // 1000
