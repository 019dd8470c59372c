"""Is a decision that has not finished yet still moving? The decide workers' CPU clocks.

The service watchdog must restart an agent whose decide path is stuck (a deadlock, a read
that never returns, a frozen thread) and must not restart one that is merely slow (a large
file hashed on a loaded 2-core host, a flood of 2-second verifications under qemu): a
restart fails open while it lasts and makes a slow host no faster. A finished decision is
progress; so is a busy worker whose thread keeps using CPU, which a thread blocked in a
lock, a read or ptrace does not. Each worker owns a ``WorkerClock``; the loop samples them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Optional

MIN_CPU_NS = 1_000_000  # 1 ms of CPU since the last progress: a wait's wake-ups stay below
RUNAWAY_S = 120.0  # a decision running longer than this is stuck, even if it spins


class WorkerClock:
    """The CPU clock of one decide worker thread; made on that thread."""

    def __init__(self) -> None:
        self.tid = threading.get_native_id()
        self._clock: Optional[int] = None
        # without per-thread clocks only finished decisions count as progress
        with contextlib.suppress(AttributeError, OSError):
            self._clock = time.pthread_getcpuclockid(threading.get_ident())
        self.busy_since: Optional[float] = None  # monotonic, while deciding
        self._mark = 0  # CPU ns when progress was last noted

    def cpu_ns(self) -> Optional[int]:
        if self._clock is None:
            return None
        try:
            return time.clock_gettime_ns(self._clock)
        except OSError:
            return None

    def begin(self) -> None:
        """On the worker, before a decision."""
        self._mark = self.cpu_ns() or 0
        self.busy_since = time.monotonic()

    def end(self) -> None:
        self.busy_since = None

    def moved(self, now: float) -> bool:
        """From any thread: the worker is deciding, has used at least MIN_CPU_NS of CPU since
        the last time this said True, and its decision is not a runaway."""
        since = self.busy_since
        if since is None or now - since > RUNAWAY_S:
            return False
        cpu = self.cpu_ns()
        if cpu is None or cpu - self._mark < MIN_CPU_NS:
            return False
        self._mark = cpu
        return True
