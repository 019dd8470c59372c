"""The bounded queue and writer thread: submit never blocks, whatever the sink does."""

from __future__ import annotations

import threading
import time
from typing import List

import pytest

from agent.record.writer import QueuedWriter, SinkStats


class StuckSink:
    """A sink that hangs until released: a wedged kernel queue or a frozen disk."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.seen: List[int] = []
        self.closed = False

    def write_batch(self, items: List[int], stats: SinkStats) -> None:
        self.entered.set()
        self.release.wait(30)
        self.seen.extend(items)
        stats.wrote(len(items))

    def close(self) -> None:
        self.closed = True


class BrokenSink:
    def __init__(self) -> None:
        self.calls = 0

    def write_batch(self, items: List[int], stats: SinkStats) -> None:
        self.calls += 1
        raise RuntimeError("boom")

    def close(self) -> None:
        pass


def test_stuck_sink_never_blocks_submit() -> None:
    sink = StuckSink()
    w: QueuedWriter[int] = QueuedWriter("t", sink, maxsize=10)
    w.start()
    try:
        assert w.submit(0)
        assert sink.entered.wait(5)
        t0 = time.monotonic()
        results = [w.submit(i) for i in range(1, 1001)]
        assert time.monotonic() - t0 < 1.0
        assert results.count(True) == 10
        assert w.stats.dropped_by("queue-full") == 990
        assert not w.wait_idle(0.05)
    finally:
        sink.release.set()
    assert w.close(5)
    assert sink.seen == list(range(11)) and sink.closed
    snap = w.stats.snapshot()
    assert snap["written"] == 11 and snap["dropped"] == 990
    assert not w.submit(5) and w.stats.dropped_by("shutdown") == 1


def test_close_has_a_deadline_when_the_sink_hangs() -> None:
    sink = StuckSink()
    w: QueuedWriter[int] = QueuedWriter("t", sink, maxsize=100)
    w.start()
    w.submit(0)
    assert sink.entered.wait(5)  # the writer holds record 0; 1-49 wait in the queue
    for i in range(1, 50):
        w.submit(i)
    t0 = time.monotonic()
    assert not w.close(0.3)
    assert time.monotonic() - t0 < 2.0
    sink.release.set()  # let the daemon thread finish: the rest is counted, not written
    deadline = time.monotonic() + 5
    while w.stats.written + w.stats.dropped_total() < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (w.stats.written, w.stats.dropped_by("shutdown")) == (1, 49)


def test_a_failing_sink_is_counted_and_the_thread_lives() -> None:
    sink = BrokenSink()
    w: QueuedWriter[int] = QueuedWriter("t", sink)
    w.start()
    for i in range(3):
        w.submit(i)
        assert w.wait_idle(5)
    assert w.close(5)
    snap = w.stats.snapshot()
    assert snap["dropped_by_cause"] == {"io-error": 3}
    assert snap["last_error"] == "RuntimeError: boom" and sink.calls == 3


def test_bad_queue_size() -> None:
    with pytest.raises(ValueError, match="queue size must be at least 1"):
        QueuedWriter("t", BrokenSink(), maxsize=0)
