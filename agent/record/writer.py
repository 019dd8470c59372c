"""A bounded queue drained by one writer thread: the decision path only ever enqueues.

``submit`` never blocks: when the queue is full the record is dropped and counted. The sink
runs on the writer thread; it reports what it wrote or dropped (and why) through the
``SinkStats`` it is given. ``close`` drains what it can before a deadline, counts the rest as
dropped, and never waits past that deadline (the thread is a daemon, so a sink stuck in the
kernel cannot hold up the agent's exit either).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Dict, Generic, List, Optional, Protocol, TypeVar

T = TypeVar("T")

# drop causes: a public contract (status output, docs/records.md)
QUEUE_FULL = "queue-full"
DISK_FULL = "disk-full"
IO_ERROR = "io-error"
NO_AUDITD = "no-auditd"
AUDIT_DISABLED = "audit-disabled"
SEND_ERROR = "send-error"
SHUTDOWN = "shutdown"
ENCODE_ERROR = "encode-error"


class SinkStats:
    """Per-sink counters, shared by the callers (queue-full) and the writer thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._written = 0
        self._dropped: Dict[str, int] = {}
        self._last_error: Optional[str] = None

    def wrote(self, n: int = 1) -> None:
        with self._lock:
            self._written += n

    def dropped(self, cause: str, n: int = 1, error: Optional[str] = None) -> None:
        with self._lock:
            self._dropped[cause] = self._dropped.get(cause, 0) + n
            if error is not None:
                self._last_error = error

    @property
    def written(self) -> int:
        with self._lock:
            return self._written

    def dropped_total(self) -> int:
        with self._lock:
            return sum(self._dropped.values())

    def dropped_by(self, cause: str) -> int:
        with self._lock:
            return self._dropped.get(cause, 0)

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            return {
                "written": self._written,
                "dropped": sum(self._dropped.values()),
                "dropped_by_cause": dict(self._dropped),
                "last_error": self._last_error,
            }


class Sink(Protocol[T]):
    """Where records end up. Called only from the writer thread; must not raise."""

    def write_batch(self, items: List[T], stats: SinkStats) -> None: ...

    def close(self) -> None: ...


class QueuedWriter(Generic[T]):
    """One sink behind a bounded queue and a daemon writer thread."""

    def __init__(self, name: str, sink: Sink[T], maxsize: int = 4096, batch: int = 256) -> None:
        if maxsize < 1:
            raise ValueError(f"{name}: queue size must be at least 1, not {maxsize}")
        self.name = name
        self.stats = SinkStats(name)
        self._sink = sink
        self._queue: queue.Queue[T] = queue.Queue(maxsize)
        self._batch = batch
        self._stop = threading.Event()
        self._deadline = float("inf")
        self._thread = threading.Thread(target=self._run, name=f"execguard-{name}", daemon=True)
        self._started = False
        self._closed = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def submit(self, item: T) -> bool:
        """Enqueue without blocking; False (and counted) when full or closed."""
        if self._closed:
            self.stats.dropped(SHUTDOWN)
            return False
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.stats.dropped(QUEUE_FULL)
            return False
        return True

    def pending(self) -> int:
        return self._queue.qsize()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued record was written or dropped; False at the deadline."""
        q = self._queue
        with q.all_tasks_done:  # Queue.join() with a deadline
            return q.all_tasks_done.wait_for(lambda: q.unfinished_tasks == 0, timeout)

    def _take(self, timeout: float) -> List[T]:
        try:
            items = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(items) < self._batch:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _run(self) -> None:
        while True:
            items = self._take(0.1)
            if items:
                if time.monotonic() > self._deadline:
                    self.stats.dropped(SHUTDOWN, len(items))
                else:
                    self._write(items)
                for _ in items:
                    self._queue.task_done()
            elif self._stop.is_set():
                break
        self._close_sink()

    def _write(self, items: List[T]) -> None:
        try:
            self._sink.write_batch(items, self.stats)
        except Exception as exc:  # a sink bug must not kill the thread
            self.stats.dropped(IO_ERROR, len(items), f"{type(exc).__name__}: {exc}")

    def _close_sink(self) -> None:
        try:
            self._sink.close()
        except Exception as exc:
            self.stats.dropped(IO_ERROR, 0, f"close: {type(exc).__name__}: {exc}")

    def close(self, timeout: float = 5.0) -> bool:
        """Stop taking records, drain until the deadline; True when the thread finished."""
        self._closed = True
        if not self._started:
            self._close_sink()
            self._drop_leftovers()
            return True
        self._deadline = time.monotonic() + timeout
        self._stop.set()
        self._thread.join(timeout + 0.5)
        finished = not self._thread.is_alive()
        if finished:
            self._drop_leftovers()
        return finished

    def _drop_leftovers(self) -> None:
        n = 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            n += 1
        if n:
            self.stats.dropped(SHUTDOWN, n)
