"""Counters the exec path updates: a fixed-bucket latency histogram and decisions by label.

Both cost one dict or list increment per observation; everything Prometheus-shaped (cumulative
buckets, seconds, label sets) is derived at scrape time from their snapshots.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Tuple

from agent.decision import Decision

# Upper bounds in microseconds: a cache hit is tens of µs, a verification milliseconds, a
# large binary on a slow disk seconds (docs/performance.md).
LATENCY_BOUNDS_US: Tuple[int, ...] = (
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000)


@dataclass(frozen=True)
class HistogramSnapshot:
    bounds_us: Tuple[int, ...]
    cumulative: Tuple[int, ...]  # observations <= each bound, then the +Inf total last
    sum_us: int

    @property
    def count(self) -> int:
        return self.cumulative[-1]


class LatencyHistogram:
    """Per-bucket counts; NOT locked: the owner updates and snapshots it under its own lock."""

    def __init__(self, bounds_us: Tuple[int, ...] = LATENCY_BOUNDS_US) -> None:
        if list(bounds_us) != sorted(set(bounds_us)):
            raise ValueError(f"bucket bounds must be strictly increasing: {bounds_us}")
        self.bounds_us = bounds_us
        self._counts: List[int] = [0] * (len(bounds_us) + 1)  # the last one is +Inf
        self._sum_us = 0

    def observe(self, value_us: int) -> None:
        # the first bound >= value: Prometheus buckets are "less than or equal"
        self._counts[bisect_left(self.bounds_us, value_us)] += 1
        self._sum_us += value_us

    def snapshot(self) -> HistogramSnapshot:
        running, cumulative = 0, []
        for n in self._counts:
            running += n
            cumulative.append(running)
        return HistogramSnapshot(self.bounds_us, tuple(cumulative), self._sum_us)


DecisionKey = Tuple[str, str, str, str]  # verdict, reason, enforcement, backend


def decision_key(d: Decision) -> DecisionKey:
    """The labels of one decision, named as in the decision log (``decision``, ``reason``,
    ``enforcement``, ``event.backend``)."""
    return ("allow" if d.allow else "deny", d.reason.value, d.enforcement.value,
            d.event.backend)


class DecisionTally:
    """Every recorded decision, counted by its labels (thread-safe). The label values come
    from closed sets (verdict, reason codes, enforcement, backend), so the count of series
    stays small."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[DecisionKey] = Counter()

    def add(self, d: Decision) -> None:
        key = decision_key(d)
        with self._lock:
            self._counts[key] += 1

    def snapshot(self) -> Dict[DecisionKey, int]:
        with self._lock:
            return dict(self._counts)
