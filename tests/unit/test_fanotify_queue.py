"""Who a decide worker serves next (agent/sensors/fanotify_queue.py): uids in turn, one job
per file version, caps. Pure data structures: no fanotify here."""

from __future__ import annotations

import itertools
import threading
from typing import List, Optional

import pytest

from agent.decision import ExecEvent, FileIdentity
from agent.sensors.fanotify_model import Pending
from agent.sensors.fanotify_queue import FairQueue, Job

_fds = itertools.count(100)


def pending(uid: int, ino: int) -> Pending:
    event = ExecEvent(pid=1000 + ino, ppid=1, uid=uid, auid=-1, comm="t", path=f"/s/{ino}",
                      identity=FileIdentity(1, ino, 5, 10), timestamp_ns=0, backend="t")
    return Pending(next(_fds), event, 0, 1e9)


def take_job(q: FairQueue) -> Job:
    work = q.take(timeout=0)
    assert isinstance(work, Job), work
    return work


def order(q: FairQueue) -> List[int]:
    """The inodes of the jobs in the order workers would take them."""
    out = []
    while True:
        work = q.take(timeout=0)
        if work is None:
            return out
        assert isinstance(work, Job)
        out.append(work.key[1])
        q.finish(work)


def test_uids_take_turns() -> None:
    q = FairQueue(100, 100)
    for ino in range(1, 6):
        assert q.offer(pending(65534, ino))  # a flood by one uid
    assert q.offer(pending(0, 50))
    assert q.offer(pending(1000, 60))
    assert q.offer(pending(0, 51))
    assert order(q) == [1, 50, 60, 2, 51, 3, 4, 5]


def test_the_same_file_version_is_one_job_with_every_waiter() -> None:
    q = FairQueue(100, 100)
    first, again, other_uid = pending(0, 7), pending(0, 7), pending(1000, 7)
    for p in (first, again, other_uid):
        assert q.offer(p)
    job = take_job(q)
    assert job.waiters == [first, again, other_uid]
    late = pending(0, 7)
    assert q.offer(late)  # joins while being decided: answered with it
    assert q.finish(job) == [first, again, other_uid, late]
    assert q.stats()["queued_execs"] == 0
    assert q.take(timeout=0) is None  # uid 1000's reference to the job is skipped
    assert q.offer(pending(0, 7))  # after the decision: a new job
    assert take_job(q) is not job


def test_a_joiner_is_served_at_its_own_turn() -> None:
    """Exec'ing a victim's file first must not push the victim to the back of a flood."""
    q = FairQueue(100, 100)
    for ino in range(1, 10):
        assert q.offer(pending(65534, ino))
    assert q.offer(pending(0, 9))  # the victim's exec joins the flood's last job
    assert order(q) == [1, 9, 2, 3, 4, 5, 6, 7, 8]


def test_caps_refuse_past_the_total_and_per_uid() -> None:
    q = FairQueue(max_pending=4, max_per_uid=2)
    assert q.offer(pending(1, 1)) and q.offer(pending(1, 2))
    assert not q.offer(pending(1, 3))  # uid 1 is at its cap
    assert not q.offer(pending(1, 1))  # joining counts too
    assert q.offer(pending(2, 4)) and q.offer(pending(3, 5))
    assert not q.offer(pending(4, 6))  # the total cap
    q.finish(take_job(q))
    assert q.offer(pending(1, 3))  # room again
    with pytest.raises(ValueError):
        FairQueue(0, 1)


def test_finish_counts_once() -> None:
    q = FairQueue(10, 10)
    assert q.offer(pending(0, 1))
    job = take_job(q)
    q.finish(job)
    q.finish(job)  # an error path may finish twice: counted once
    assert q.stats()["queued_execs"] == 0


def test_a_job_nobody_waits_for_is_dropped_in_one_step() -> None:
    q = FairQueue(10, 10)
    early, late = pending(0, 1), pending(0, 1)
    assert q.offer(early)
    job = take_job(q)
    early.answered = True  # the deadline's answer
    assert q.offer(late)  # a new exec joins before the worker looks
    assert q.finish_if_unheard(job) is None  # someone waits: decide it
    late.answered = True
    assert q.finish_if_unheard(job) == [early, late]
    assert q.stats()["queued_execs"] == 0


def test_close_wakes_the_workers_and_returns_what_nobody_took() -> None:
    q = FairQueue(10, 10)
    got: List[Optional[object]] = []
    worker = threading.Thread(target=lambda: got.append(q.take()))
    worker.start()
    leftover = pending(0, 1)
    assert q.offer(leftover)
    worker.join(5)
    assert isinstance(got[0], Job)  # woken by the offer
    queued = pending(1, 3)
    assert q.offer(queued)
    sleeper = threading.Thread(target=lambda: got.append(q.take()))
    assert [p.fd for p in q.close()] == [queued.fd]
    sleeper.start()
    sleeper.join(5)
    assert got[1] is None and not q.offer(pending(0, 4))
