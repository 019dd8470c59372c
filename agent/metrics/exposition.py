"""The agent's state as Prometheus metric families, read at scrape time (docs/metrics.md).

Nothing here runs on the exec path: a scrape (or a textfile write) reads ``Agent.status()``,
the decider's histograms and the decision tally, and turns them into families. The exec
path only ever bumps the counters those read. Values another feature may or may not
provide (a bundle's expiry, break-glass) are read defensively: absent means not exported,
a shape we do not understand is ignored rather than fatal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from agent.metrics.tally import DecisionKey, HistogramSnapshot

NS = "execguard"
STATES = ("starting", "ready", "degraded", "alarm")  # alarm: a signed bundle expired
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Readings:
    """One consistent-enough look at the agent, taken when a scrape asks."""

    status: Dict[str, Any]
    histograms: Dict[str, HistogramSnapshot]
    decisions: Dict[DecisionKey, int]
    policy_loaded_at: Optional[float] = None  # unix time of the last policy swap
    up: bool = True  # False in the final textfile written as the agent stops
    started_at: Optional[float] = None  # unix time the agent started
    taken_at: float = field(default_factory=time.time)


def _num(value: Any) -> Optional[float]:
    """A count from a stats dict, or None when it is not a plain number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def timestamp(value: Any) -> Optional[float]:
    """Unix seconds from an epoch number or an ISO-8601 string (``Z`` allowed); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    return None


def _first(doc: Any, *paths: Tuple[str, ...]) -> Any:
    """The value at the first of ``paths`` (nested keys) present in ``doc``."""
    for path in paths:
        node = doc
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def policy_expiry(status: Dict[str, Any]) -> Optional[float]:
    """When the running policy stops being valid (the signed bundle in force expires), if
    status says (``policy_bundle.in_force.expires``, docs/bundles.md)."""
    return timestamp(_first(status, ("policy_bundle", "in_force", "expires"),
                            ("policy", "expires"), ("policy", "expires_at")))


def break_glass(status: Dict[str, Any]) -> Tuple[Optional[bool], Optional[float]]:
    """(active, ends) of a break-glass token (``breakglass.active`` and ``.not_after``,
    docs/breakglass.md), or (None, None) when status has no such section."""
    doc = _first(status, ("breakglass",), ("break_glass",))
    if isinstance(doc, bool):
        return doc, None
    if not isinstance(doc, dict):
        return None, None
    until = timestamp(_first(doc, ("not_after",), ("expires_at",), ("until",)))
    active = doc.get("active")
    if not isinstance(active, bool):  # no flag: active while its end is ahead
        active = until is not None and until > time.time()
    return active, until


def _histogram(name: str, doc: str, snap: HistogramSnapshot) -> HistogramMetricFamily:
    buckets: List[Tuple[str, float]] = [
        (f"{bound / 1e6:g}", float(n))  # as Go's %g: 5e-05, 0.001, 2.5, 10
        for bound, n in zip(snap.bounds_us, snap.cumulative)]
    buckets.append(("+Inf", float(snap.count)))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=snap.sum_us / 1e6)


def _counter(name: str, doc: str, value: Any) -> Optional[CounterMetricFamily]:
    n = _num(value)
    return CounterMetricFamily(name, doc, value=n) if n is not None else None


def _gauge(name: str, doc: str, value: Any) -> Optional[GaugeMetricFamily]:
    n = _num(value)
    return GaugeMetricFamily(name, doc, value=n) if n is not None else None


def agent_families(r: Readings) -> Iterator[Metric]:
    st = r.status
    yield GaugeMetricFamily(f"{NS}_up", "1 while the agent runs; 0 in the last textfile it "
                            "wrote as it stopped", value=1.0 if r.up else 0.0)
    started = r.started_at
    if started is None:  # status only has a rounded uptime
        uptime = _num(st.get("uptime_s"))
        started = None if uptime is None else round(r.taken_at - uptime, 1)
    if started is not None:
        yield GaugeMetricFamily(f"{NS}_start_time_seconds", "When the agent started (unix "
                                "time)", value=started)
    info = GaugeMetricFamily(f"{NS}_agent_info", "The agent: version, backend, enforcement "
                             "and mode (always 1)",
                             labels=["version", "backend", "enforcement", "mode"])
    info.add_metric([str(st.get("version")), str(st.get("backend")),
                     str(st.get("enforcement")), str(st.get("mode"))], 1)
    yield info
    state = GaugeMetricFamily(f"{NS}_agent_state", "1 for the state the agent is in "
                              "(starting, ready, degraded, alarm)", labels=["state"])
    current = str(st.get("state"))
    for name in STATES + (() if current in STATES else (current,)):
        state.add_metric([name], 1.0 if current == name else 0.0)
    yield state
    backend = GaugeMetricFamily(f"{NS}_backend_info", "The backend that passed its self-test "
                                "and how its denials are enforced (always 1)",
                                labels=["backend", "enforcement"])
    backend.add_metric([str(st.get("backend")), str(st.get("enforcement"))], 1)
    yield backend
    skipped = GaugeMetricFamily(f"{NS}_backend_skipped", "Backends preferred over the running "
                                "one that failed their self-test (1 each)", labels=["backend"])
    for item in st.get("skipped_backends") or ():
        if isinstance(item, dict) and isinstance(item.get("backend"), str):
            skipped.add_metric([item["backend"]], 1)
    yield skipped
    warnings = st.get("warnings")
    if isinstance(warnings, list):
        yield GaugeMetricFamily(f"{NS}_warnings", "Warnings `execguard status` shows",
                                value=len(warnings))


def policy_families(r: Readings) -> Iterator[Metric]:
    st = r.status
    found = st.get("policy")
    policy: Dict[str, Any] = found if isinstance(found, dict) else {}
    info = GaugeMetricFamily(f"{NS}_policy_info", "The running policy (always 1)",
                             labels=["version", "digest", "source", "mode"])
    info.add_metric([str(policy.get("version")), str(policy.get("digest")),
                     str(policy.get("source")), str(st.get("mode"))], 1)
    yield info
    for family in (_gauge(f"{NS}_policy_version", "The running policy's version number",
                          policy.get("version")),
                   _gauge(f"{NS}_policy_loaded_timestamp_seconds", "When the running policy "
                          "was installed (unix time)", r.policy_loaded_at),
                   _gauge(f"{NS}_policy_expiry_timestamp_seconds", "When the running "
                          "policy's signed bundle expires (unix time); absent when it has no "
                          "expiry", policy_expiry(st))):
        if family is not None:
            yield family
    active, until = break_glass(st)
    yield GaugeMetricFamily(f"{NS}_break_glass_active", "1 while a break-glass token "
                            "(forced monitor mode) is in effect", value=1.0 if active else 0.0)
    if active and until is not None:
        yield GaugeMetricFamily(f"{NS}_break_glass_expiry_timestamp_seconds", "When the "
                                "active break-glass token ends (unix time)", value=until)


def decision_families(r: Readings) -> Iterator[Metric]:
    decisions = CounterMetricFamily(
        f"{NS}_decisions", "Recorded exec decisions; labels as in the decision log "
        "(verdict = its 'decision' field)",
        labels=["verdict", "reason", "enforcement", "backend"])
    for key, n in sorted(r.decisions.items()):
        decisions.add_metric(list(key), n)
    yield decisions
    dec = r.status.get("decisions")
    errors = _counter(f"{NS}_decision_read_errors", "Decisions that could not read or verify "
                      "the file (reason verify-failed)",
                      dec.get("errors") if isinstance(dec, dict) else None)
    if errors is not None:
        yield errors
    hist = r.histograms
    if "decision" in hist:
        yield _histogram(f"{NS}_decision_duration_seconds", "Time from an exec reaching the "
                         "decider to its decision (cache hits included)", hist["decision"])
    if "verify" in hist:
        yield _histogram(f"{NS}_verification_duration_seconds", "Time one signature "
                         "verification took (cache misses and pre-warming)", hist["verify"])


CACHE_COUNTERS = (
    ("hits", "Verdict lookups the trusted cache answered"),
    ("misses", "Verdict lookups the trusted cache could not answer (a verification follows)"),
    ("digest_hits", "Verdicts reused by content for a copy of a verified file"),
    ("stale", "Entries found for a file changed since it was verified"),
    ("expired", "Negative verdicts older than their time to live"),
    ("evictions", "Entries evicted over capacity"),
    ("rebinds", "Times a policy or trust change emptied the cache"),
    ("flush_errors", "Failed writes of the cache file"),
)


def cache_families(r: Readings) -> Iterator[Metric]:
    cache = r.status.get("cache")
    if not isinstance(cache, dict):
        return
    for key, doc in CACHE_COUNTERS:
        family = _counter(f"{NS}_cache_{key}", doc, cache.get(key))
        if family is not None:
            yield family
    entries = _gauge(f"{NS}_cache_entries", "Verdicts the trusted cache holds",
                     cache.get("entries"))
    if entries is not None:
        yield entries


def lost_events(sensor: Dict[str, Any]) -> Dict[str, float]:
    """Events the sensor lost, by cause, from whatever shape the runner's stats have."""
    out: Dict[str, float] = {}

    def add(cause: str, value: Any) -> None:
        n = _num(value)
        if n is not None:
            out[cause] = out.get(cause, 0.0) + n

    inner = sensor.get("sensor")
    if isinstance(inner, dict):  # BCC ring buffer (kill, audit-only, bpf-lsm)
        add("ring-buffer-full", inner.get("drops"))
    add("fanotify-queue-overflow", sensor.get("overflows"))  # notification sensor
    add("observer-backlog", sensor.get("observer_dropped"))  # fanotify decided, not recorded
    feeder = sensor.get("fanotify_stats")
    if isinstance(feeder, dict):
        add("observer-backlog", feeder.get("observer_dropped"))
    return out


SENSOR_ERRORS = (("read", "read_errors"), ("poll", "poll_errors"), ("loop", "loop_errors"),
                 ("worker", "worker_errors"), ("response", "response_errors"),
                 ("heartbeat", "heartbeat_errors"), ("observer", "observer_errors"),
                 ("ignore-mark", "ignore_mark_errors"), ("mark", "mark_errors"),
                 ("mount-watch", "mount_refresh_errors"), ("write-open", "write_open_errors"))


def _fanotify_parts(sensor: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The fanotify permission backend's stats: the runner's own, or the bpf-lsm feeder's."""
    parts = [sensor]
    feeder = sensor.get("fanotify_stats")
    if isinstance(feeder, dict):
        parts.append(feeder)
    return parts


def sensor_errors(sensor: Dict[str, Any]) -> Dict[str, float]:
    """Errors the fanotify backend survived (counted, never a dead thread), by kind."""
    out: Dict[str, float] = {}
    for part in _fanotify_parts(sensor):
        for kind, key in SENSOR_ERRORS:
            n = _num(part.get(key))
            if n is not None:
                out[kind] = out.get(kind, 0.0) + n
    return out


def sensor_families(r: Readings) -> Iterator[Metric]:
    st = r.status
    backend = str(st.get("backend"))
    sensor = st.get("sensor")
    sensor = sensor if isinstance(sensor, dict) else {}
    errors = CounterMetricFamily(f"{NS}_sensor_errors", "Errors the fanotify backend "
                                 "survived, by kind (read: a read of the group failed, e.g. "
                                 "EMFILE, and the kernel denied that exec)",
                                 labels=["backend", "kind"])
    for kind, n in sorted(sensor_errors(sensor).items()):
        errors.add_metric([backend, kind], n)
    yield errors
    overload = [n for n in (_num(p.get("overload")) for p in _fanotify_parts(sensor))
                if n is not None]
    if overload:
        family = CounterMetricFamily(f"{NS}_sensor_overload", "Execs denied at once: too "
                                     "many waited for a decision", labels=["backend"])
        family.add_metric([backend], sum(overload))
        yield family


def drop_families(r: Readings) -> Iterator[Metric]:
    st = r.status
    backend = str(st.get("backend"))
    lost = CounterMetricFamily(f"{NS}_sensor_lost_events", "Exec events the sensor lost "
                               "(ring buffer full, fanotify queue overflow, decided but over "
                               "the recording backlog)", labels=["backend", "cause"])
    sensor = st.get("sensor")
    for cause, n in sorted(lost_events(sensor if isinstance(sensor, dict) else {}).items()):
        lost.add_metric([backend, cause], n)
    yield lost
    written = CounterMetricFamily(f"{NS}_records_written", "Records written, per sink",
                                  labels=["sink"])
    dropped = CounterMetricFamily(f"{NS}_records_dropped", "Records dropped instead of "
                                  "waited for, per sink and cause", labels=["sink", "cause"])
    queued = GaugeMetricFamily(f"{NS}_records_queued", "Records waiting for their sink",
                               labels=["sink"])
    records = st.get("records")
    for sink, doc in sorted((records if isinstance(records, dict) else {}).items()):
        if not isinstance(doc, dict) or _num(doc.get("written")) is None:
            continue  # a sink that is off
        written.add_metric([sink], float(doc["written"]))
        causes = doc.get("dropped_by_cause")
        for cause, n in sorted((causes if isinstance(causes, dict) else {}).items()):
            if _num(n) is not None:
                dropped.add_metric([sink, str(cause)], float(n))
        if _num(doc.get("queued")) is not None:
            queued.add_metric([sink], float(doc["queued"]))
    yield written
    yield dropped
    yield queued
    console = _counter(f"{NS}_console_dropped", "Console decision lines dropped (a slow "
                       "terminal)", st.get("console_dropped"))
    if console is not None:
        yield console


def prewarm_families(r: Readings) -> Iterator[Metric]:
    pre = r.status.get("prewarm")
    if not isinstance(pre, dict):
        return
    for key, doc in (("verified", "Files verified ahead of their first exec"),
                     ("errors", "Files pre-warming could not read")):
        family = _counter(f"{NS}_prewarm_{key}", doc, pre.get(key))
        if family is not None:
            yield family


FAMILIES = (agent_families, policy_families, decision_families, cache_families,
            drop_families, sensor_families, prewarm_families)


def families(r: Readings) -> List[Metric]:
    return [m for make in FAMILIES for m in make(r)]


class AgentCollector(Collector):
    """A prometheus_client collector: ``read()`` is called at each collection."""

    def __init__(self, read: Callable[[], Readings]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        return families(self._read())

    def describe(self) -> Iterable[Metric]:
        return []  # names vary with the agent's state; skip the registry's duplicate check


def make_registry(read: Callable[[], Readings]) -> CollectorRegistry:
    """The agent's collector plus the process collector. ``process_*`` carries the
    ``execguard_`` prefix: node_exporter exports its own unprefixed ``process_*``, and a
    textfile repeating those names would be refused."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(read))
    ProcessCollector(namespace=NS, registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
