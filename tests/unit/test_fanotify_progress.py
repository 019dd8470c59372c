"""A decide worker's CPU clock tells a slow decision from a stuck one
(agent/sensors/fanotify_progress.py)."""

from __future__ import annotations

import hashlib
import threading
import time
from typing import List

from agent.sensors.fanotify_progress import RUNAWAY_S, WorkerClock


def _in_thread(work: str, clocks: List[WorkerClock], go: threading.Event,
               done: threading.Event) -> None:
    clock = WorkerClock()
    clocks.append(clock)
    clock.begin()
    go.set()
    if work == "hash":  # a slow verification: the thread keeps using CPU
        data = bytes(1 << 20)
        while not done.is_set():
            hashlib.sha256(data).digest()
    else:  # a wedge: blocked in a lock, no CPU at all
        done.wait()
    clock.end()


def _moved(work: str) -> bool:
    clocks: List[WorkerClock] = []
    go, done = threading.Event(), threading.Event()
    t = threading.Thread(target=_in_thread, args=(work, clocks, go, done))
    t.start()
    try:
        go.wait(5)
        time.sleep(0.3)
        return clocks[0].moved(time.monotonic())
    finally:
        done.set()
        t.join(5)


def test_a_busy_worker_moves_a_blocked_one_does_not() -> None:
    assert _moved("hash")
    assert not _moved("block")


def test_an_idle_or_runaway_worker_is_no_progress() -> None:
    clock = WorkerClock()
    assert not clock.moved(time.monotonic())  # not deciding
    clock.begin()
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:
        hashlib.sha256(bytes(1 << 16)).digest()
    assert not clock.moved(time.monotonic() + RUNAWAY_S + 1)  # deciding for too long
    assert clock.moved(time.monotonic())
    clock.end()
