"""The fanotify permission backend: every exec on the scoped mounts waits for our answer.

One loop thread reads permission events and answers whatever it can at once: the agent's
own pid and the exempt pids first (the fapolicyd deadlock lesson: nothing, not even a lock
or a path lookup, comes before that check), then files outside the scopes, then the
agent's descendants. Everything else goes to a
worker that calls ``decide(event, fd)``; the loop answers ``on_timeout`` for any event whose
decision misses the deadline. Allowed files get an ignore mark, so the kernel stops asking
until their content changes. The loop beats a heartbeat that a watchdog process watches
(fanotify itself never times out; see agent/sensors/fanotify_watchdog.py).
"""

from __future__ import annotations

import os
import queue
import select
import subprocess
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

from agent.sensors import fanotify_scope as scope
from agent.sensors import fanotify_sys as fs
from agent.sensors.fanotify_model import (
    ALLOW_ONCE,
    Cause,
    Decide,
    Lookup,
    Observer,
    Outcome,
    Pending,
)
from agent.service.heartbeat import Heartbeat

__all__ = ["Cause", "Decide", "FanotifyBackend", "Lookup", "Observer", "Outcome"]

NOTE_BACKLOG = 10000  # outcomes waiting for the observer before new ones are dropped


class FanotifyBackend:
    """Answer exec permission events on the mounts that hold ``scopes``.

    ``decide`` runs on a worker thread and must verify the file through ``fd`` (the exact
    file being executed), never by re-opening the path, and must never write to a watched
    mount. ``lookup``, when given, runs on the loop thread first and may answer from memory
    (True/False) or pass (None); it must never block, read a file or take a lock that
    decide() holds. ``observer`` gets every answer (and late results) on its own thread.
    The lock is never held across decide(), an open or anything else that can wait for
    a permission answer.
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
    ) -> None:
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be positive, got {deadline_s}")
        self._scopes = scope.resolve(scopes)
        self._decide, self._observer, self._lookup = decide, observer, lookup
        self._deadline, self._on_timeout = float(deadline_s), bool(on_timeout_allow)
        self._exempt = set(exempt_pids)
        self._descendants, self._ignore_marks = exempt_descendants, ignore_marks
        self._hb, self._want_mask, self._nworkers = heartbeat_fd, mask, max(1, workers)
        self._beat_s = max(0.01, min(self._deadline / 4, 0.5))
        self._pid = os.getpid()
        self._born = scope.parent_of(self._pid)[1]  # start time, to cut ancestry walks short
        self._group = -1
        self._mask = 0
        self._epoch = 0  # +1 per forget_allowed(): a verdict from before must not mark
        self.heartbeat = Heartbeat("fanotify")  # each loop turn: the service watchdog
        self._lock = threading.Lock()
        self._pending: Dict[int, Pending] = {}
        # handed to the workers and not decided yet (answered by on_timeout or not): the
        # service watchdog's proof that decisions, not only the loop, make progress
        self._undecided: Dict[int, Pending] = {}
        self._decided_at = time.monotonic()  # when a worker last finished a decision
        self.worker_tids: List[int] = []  # for diagnostics (the service verb) and tests
        self._work: queue.SimpleQueue[Optional[Pending]] = queue.SimpleQueue()
        self._notes: queue.SimpleQueue[Optional[Outcome]] = queue.SimpleQueue()
        self._threads: List[threading.Thread] = []
        self._stopping = False
        self._wake_r, self._wake_w = -1, -1
        self._state = "new"
        self._n: Dict[str, int] = dict.fromkeys(
            [c.value for c in Cause]
            + ["events", "allowed", "denied", "ignore_marks", "ignore_mark_errors"]
            + ["response_errors", "observer_errors", "observer_dropped", "heartbeat_errors"]
            + ["max_latency_us"],
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

    def exempt(self, pid: int) -> None:
        """Answer this pid's events with allow at once, from now on (e.g. a helper)."""
        self._exempt.add(pid)

    def start(self) -> None:
        """Create the group, mark the mounts, start the threads. Raises OSError."""
        if self._state != "new":
            raise RuntimeError(f"FanotifyBackend.start() in state {self._state}")
        # CPython 3.10/3.11 (3.11.2 here) spawn children with vfork() while holding the GIL:
        # a child of the agent whose exec waits for our answer would then freeze the loop
        # thread forever. fork() costs a little more and cannot deadlock that way.
        if getattr(subprocess, "_USE_VFORK", False):
            setattr(subprocess, "_USE_VFORK", False)  # noqa: B010 (a Final in typeshed)
        flags = fs.FAN_CLASS_CONTENT | fs.FAN_CLOEXEC | fs.FAN_NONBLOCK
        flags |= fs.FAN_UNLIMITED_QUEUE | fs.FAN_UNLIMITED_MARKS
        self._group = fs.fanotify_init(flags, fs.EVENT_F_FLAGS | os.O_CLOEXEC)
        self._wake_r, self._wake_w = os.pipe()
        self._state = "starting"
        masks = [self._want_mask] if self._want_mask else list(fs.MASK_NAMES)
        try:
            # Marks first, so the mask is known before any event is handled; an event that
            # arrives before the loop runs waits only until it starts, a moment later.
            self._mask = fs.mark_mounts(self._group, self._scopes.mounts, masks)
        except BaseException:
            self.stop()
            raise
        self._spawn(self._loop, "fanotify-loop")
        for i in range(self._nworkers):
            self._spawn(self._worker, f"fanotify-decide-{i}")
        if self._observer is not None:
            self._spawn(self._notifier, "fanotify-notify")
        self._state = "running"

    def stop(self, join_s: float = 5.0) -> None:
        """Answer everything pending (on_timeout), close the group, end the threads."""
        if self._state in ("new", "stopped"):
            self._state = "stopped"
            return
        self._stopping = True
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
        for _ in range(self._nworkers):
            self._work.put(None)
        self._notes.put(None)
        for t in self._threads:
            if t.name != "fanotify-loop":
                t.join(join_s)  # a decide() stuck forever stays behind (daemon thread)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._state = "stopped"

    def forget_allowed(self) -> None:
        """Drop every ignore mark (a new policy: allowed files are asked again). A decision
        still running under the old policy answers its exec but leaves no mark behind."""
        with self._lock:
            self._epoch += 1
            if self._group >= 0:
                try:
                    fs.fanotify_mark(self._group, fs.FAN_MARK_FLUSH, 0, fs.AT_FDCWD, None)
                except OSError:
                    self._n["ignore_mark_errors"] += 1

    def stats(self) -> Dict[str, Union[int, str]]:
        with self._lock:
            out: Dict[str, Union[int, str]] = dict(self._n)
            out["pending"] = len(self._pending)
        out.update(state=self._state, mask=self.mask_name, backend=self.backend_name)
        out["marked_mounts"] = len(self._scopes.mounts)
        return out

    # -- marks ------------------------------------------------------------------------
    def _ignore(self, p: Pending, epoch: Optional[int] = None, mark: bool = True) -> bool:
        """Kernel-side cache, then a re-check of the stamp: a change that raced the mark
        means the verdict covers other bytes. Lock held; returns False when it changed.
        ``epoch``: the policy epoch the verdict was made in; a stale one adds no mark.
        ``mark`` False (an ``ALLOW_ONCE`` answer): only the re-check, no mark."""
        marked = (mark and self._ignore_marks and self._group >= 0
                  and epoch in (None, self._epoch))
        if marked:
            try:
                fs.ignore_mark(self._group, self._mask, p.fd)
                self._n["ignore_marks"] += 1
            except OSError:
                self._n["ignore_mark_errors"] += 1
                marked = False
        if scope.file_identity(os.fstat(p.fd)) == p.event.identity:
            return True
        if marked:
            try:
                fs.ignore_mark(self._group, self._mask, p.fd, add=False)
            except OSError:
                self._n["ignore_mark_errors"] += 1
        return False

    # -- threads ----------------------------------------------------------------------
    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self._group, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping:
            ready = poller.poll(self._timeout_ms())
            self.heartbeat.beat()
            self._beat()
            if any(fd == self._group for fd, _ in ready):
                self._drain()
            self._expire()
        if self._state.startswith("failed"):
            with self._lock:  # fail open: closing the group makes the kernel allow
                for p in list(self._pending.values()):
                    self._answer(p, self._on_timeout, Cause.STOPPING)
                os.close(self._group)
                self._group = -1

    def _timeout_ms(self) -> int:
        now = time.monotonic()
        wait = self._beat_s
        with self._lock:
            for p in self._pending.values():
                wait = min(wait, p.deadline - now)
        return max(0, int(wait * 1000) + 1)

    def _beat(self) -> None:
        if self._hb is None:
            return
        try:
            os.write(self._hb, b".")
        except BlockingIOError:
            pass  # the watchdog has not read yet: it has beats enough
        except OSError:
            self._n["heartbeat_errors"] += 1
            self._hb = None  # watchdog gone; the daemon sees heartbeat_errors in stats

    def _drain(self) -> None:
        """One read per loop turn, so a storm still gets beats and deadlines in between."""
        try:
            buf = os.read(self._group, 4096)
        except BlockingIOError:
            return
        events, error = fs.parse_events(buf)
        for ev in events:
            self._handle(ev)
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
        path = ""
        try:
            path = os.readlink(f"/proc/self/fd/{ev.fd}")
            if self._scopes.filtered and not any(scope.under(path, d) for d in self._scopes.dirs):
                self._quick(ev, True, Cause.OUT_OF_SCOPE, path, t0)
                return
            if self._descendants and scope.descends_from(ev.pid, self._pid, self._born):
                self._quick(ev, True, Cause.EXEMPT, path, t0)
                return
            st = os.fstat(ev.fd)
            if self._mask == fs.FAN_OPEN_PERM and not scope.is_executable(st.st_mode):
                self._quick(ev, True, Cause.NOT_EXECUTABLE, path, t0)
                return
            event = scope.exec_event(ev.pid, path, st, self.backend_name)
        except OSError as e:
            self._quick(ev, False, Cause.ERROR, path, t0, f"cannot read the event: {e}")
            return
        p = Pending(ev.fd, event, t0, time.monotonic() + self._deadline)
        if self._cached(p):
            return
        with self._lock:
            self._pending[id(p)] = p
            self._undecided[id(p)] = p
        self._work.put(p)

    def _cached(self, p: Pending) -> bool:
        """Answer from the caller's memory on the loop thread: no worker hand-off."""
        lookup = self._lookup
        if lookup is None:
            return False
        try:
            verdict = lookup(p.event)
        except Exception:
            return False  # the worker path decides instead
        if verdict is None:
            return False
        allowed, cause = verdict, Cause.CACHED
        p.done = True  # decide() never sees this fd
        with self._lock:
            if allowed and not self._ignore(p):
                allowed, cause = False, Cause.CHANGED
            self._answer(p, allowed, cause)
        self._note(self._outcome(p, cause, allowed))
        return True

    def _quick(
        self, ev: fs.Event, allow: bool, cause: Cause, path: str, t0: int, detail: str = ""
    ) -> None:
        with self._lock:
            self._respond(ev.fd, allow)
            self._count(allow, cause, t0)
        os.close(ev.fd)
        self._note(Outcome(cause, allow, ev.pid, path, None, _us(t0), detail))

    def _expire(self) -> None:
        now = time.monotonic()
        late: List[Pending] = []
        with self._lock:
            for p in list(self._pending.values()):
                if now >= p.deadline and self._answer(p, self._on_timeout, Cause.TIMEOUT):
                    late.append(p)
        for p in late:
            self._note(self._outcome(p, Cause.TIMEOUT, self._on_timeout))

    def stalled_s(self) -> float:
        """How long execs have waited for the workers while none of them finished a
        decision (0.0 when none waits, or while decisions still come out: a backlog, not
        a wedge). The loop answers on_timeout and keeps beating while every worker is
        stuck, so this is what shows that decisions stopped."""
        now_ns = time.monotonic_ns()
        with self._lock:
            if not self._undecided:
                return 0.0
            waited = (now_ns - min(p.t0 for p in self._undecided.values())) / 1e9
            return max(0.0, min(waited, now_ns / 1e9 - self._decided_at))

    def _worker(self) -> None:
        with self._lock:
            self.worker_tids.append(threading.get_native_id())
        while True:
            p = self._work.get()
            if p is None:
                return
            detail = ""
            epoch = self._epoch
            mark = True
            try:
                answer = self._decide(p.event, p.fd)
                allowed, mark = bool(answer), answer is not ALLOW_ONCE
            except Exception as e:  # a verifier bug must not kill the worker: deny
                allowed, detail = False, f"decide raised {type(e).__name__}: {e}"
            with self._lock:
                p.done = True
                self._undecided.pop(id(p), None)
                self._decided_at = time.monotonic()
                if p.answered:  # the loop already gave the on_timeout answer
                    if allowed and not detail:
                        self._ignore(p, epoch, mark)  # the next exec is a kernel cache hit
                    os.close(p.fd)
                    self._n[Cause.LATE.value] += 1
                    cause = Cause.LATE
                else:
                    cause = Cause.ERROR if detail else Cause.DECIDED
                    if allowed and cause is Cause.DECIDED and not self._ignore(p, epoch, mark):
                        allowed, cause = False, Cause.CHANGED
                    self._answer(p, allowed, cause)
            self._note(self._outcome(p, cause, allowed, detail))

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
            os.close(p.fd)
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

    def _outcome(self, p: Pending, cause: Cause, allowed: bool, detail: str = "") -> Outcome:
        ev = p.event
        return Outcome(cause, allowed, ev.pid, ev.path, ev, _us(p.t0), detail)

    def _note(self, o: Outcome) -> None:
        if self._observer is None:
            return
        if self._notes.qsize() >= NOTE_BACKLOG:  # a stuck observer costs records, not RAM
            self._n["observer_dropped"] += 1
            return
        self._notes.put(o)


def _us(t0: int) -> int:
    return (time.monotonic_ns() - t0) // 1000
