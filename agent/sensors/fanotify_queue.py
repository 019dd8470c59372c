"""Which exec a decide worker takes next: per-uid queues served in turn, one job per file.

A flood of unknown execs must not starve anyone else, nor hold the host's memory:

- **Fairness.** Each real uid has its own FIFO queue, and workers take from the uids in
  turn (round-robin), so one user's thousand execs delay another user's first exec by at
  most one decision per worker, not by the whole flood.
- **One decision per file version.** Execs of the same file version (dev, ino, ctime,
  size) that arrive while it waits or is being decided join its job: the file is verified
  once. A job joined by another uid while still queued is also queued for that uid, so
  nobody can push a victim's exec to the back of a flood by exec'ing the same file first.
- **Bounds.** At most ``max_pending`` execs wait here (and ``max_per_uid`` of one uid);
  ``offer`` refuses past them and the caller answers at once, fail-closed.

The condition's lock is only held for these list operations, never across a decision.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Deque, Dict, List, Optional, Set

from agent.sensors.fanotify_model import FileKey, Pending


class Job:
    """One file version waiting for a decision, and every exec waiting for that decision.
    ``waiters[0]`` is the exec whose fd decide() reads."""

    __slots__ = ("finished", "key", "queued_for", "taken", "waiters")

    def __init__(self, first: Pending) -> None:
        self.key: FileKey = first.key
        self.waiters: List[Pending] = [first]
        self.taken = False  # a worker has it: no second worker will
        self.finished = False  # decided: no more joiners, its execs no longer counted
        self.queued_for: Set[int] = set()  # uids whose queue holds it


class FairQueue:
    def __init__(self, max_pending: int, max_per_uid: int) -> None:
        if min(max_pending, max_per_uid) < 1:
            raise ValueError("queue caps must be at least 1")
        self.max_pending, self.max_per_uid = max_pending, max_per_uid
        self._cond = threading.Condition(threading.RLock())  # finish_if_unheard nests
        self._turns: OrderedDict[int, Deque[Job]] = OrderedDict()  # uids with work, in turn
        self._open: Dict[FileKey, Job] = {}  # queued or being decided, by file version
        self._held: Dict[int, int] = {}  # uid -> its execs here (queued or being decided)
        self._total = 0
        self._closed = False

    # -- the loop thread ------------------------------------------------------------------
    def offer(self, p: Pending) -> bool:
        """Queue ``p``, or join the job of its file version; False over a cap (answer it)."""
        uid = p.event.uid
        with self._cond:
            if self._closed or self._total >= self.max_pending \
                    or self._held.get(uid, 0) >= self.max_per_uid:
                return False
            job = self._open.get(p.key)
            if job is None:
                job = Job(p)
                self._open[job.key] = job
                self._push(uid, job)
            else:
                job.waiters.append(p)
                if not job.taken and uid not in job.queued_for:
                    self._push(uid, job)  # served at this uid's turn too, whichever is first
            self._held[uid] = self._held.get(uid, 0) + 1
            self._total += 1
            self._cond.notify()
            return True

    # -- the workers ----------------------------------------------------------------------
    def take(self, timeout: Optional[float] = None) -> Optional[Job]:
        """The next uid's oldest job; None once closed, or when ``timeout`` passes with
        nothing to do."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                job = self._next_job()
                if job is not None:
                    return job
                if not self._cond.wait(timeout) and timeout is not None:
                    return None

    def finish(self, job: Job) -> List[Pending]:
        """The job's decision is made: later execs of the file start a new job. Returns
        every exec that waited for it (joiners included), for the worker to answer."""
        with self._cond:
            if not job.finished:
                job.finished = True
                if self._open.get(job.key) is job:
                    del self._open[job.key]
                for p in job.waiters:
                    self._release(p.event.uid)
            return list(job.waiters)

    def finish_if_unheard(self, job: Job) -> Optional[List[Pending]]:
        """``finish`` when every exec of the job already got an answer (the deadline's):
        nobody waits for this decision any more. None (and nothing changes) otherwise; one
        step, so no exec can join between the look and the finish."""
        with self._cond:
            if not all(p.answered for p in job.waiters):
                return None
            return self.finish(job)

    # -- the owner ------------------------------------------------------------------------
    def close(self) -> List[Pending]:
        """Stop: workers get None; returns the execs of jobs no worker took (their fds are
        the caller's to close)."""
        with self._cond:
            self._closed = True
            left = [p for job in self._open.values() if not job.taken for p in job.waiters]
            self._turns.clear()
            self._cond.notify_all()
            return left

    def stats(self) -> Dict[str, int]:
        with self._cond:
            return {"queued_execs": self._total, "queued_files": len(self._open),
                    "queued_uids": len(self._turns)}

    # -- helpers (condition held) ---------------------------------------------------------
    def _push(self, uid: int, job: Job) -> None:
        queue = self._turns.get(uid)
        if queue is None:
            queue = self._turns[uid] = deque()
        queue.append(job)
        job.queued_for.add(uid)

    def _next_job(self) -> Optional[Job]:
        """Round-robin: the first uid in turn gives its oldest job and goes to the back."""
        while self._turns:
            uid, queue = next(iter(self._turns.items()))
            job = queue.popleft()
            if queue:
                self._turns.move_to_end(uid)
            else:
                del self._turns[uid]
            if not job.taken:  # else another uid's turn took it first
                job.taken = True
                return job
        return None

    def _release(self, uid: int) -> None:
        left = self._held.get(uid, 0) - 1
        if left > 0:
            self._held[uid] = left
        else:
            self._held.pop(uid, None)
        self._total -= 1
