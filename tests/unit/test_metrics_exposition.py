"""The exposition: a real Decider deciding real signed and unsigned Go binaries, rendered
with prometheus_client and read back with its own text parser."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from agent.cache import TrustedCache, identity_from_stat
from agent.decide import Decider
from agent.decision import Decision, Enforcement, ExecEvent
from agent.metrics.exposition import Readings, break_glass, make_registry, policy_expiry, render
from agent.metrics.tally import DecisionTally, LatencyHistogram
from agent.policy import PolicyStore, apply_overrides, default_policy
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401


@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture


def samples(text: str) -> List[Sample]:
    """Every sample, through prometheus_client's strict text parser."""
    families = text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
    return [s for fam in families for s in fam.samples]


def value(text: str, name: str, **labels: str) -> Optional[float]:
    found = [s.value for s in samples(text)
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) <= 1, f"{name} {labels}: {found}"
    return found[0] if found else None


def buckets(text: str, name: str) -> List[Tuple[float, float]]:
    return sorted((float(s.labels["le"]), s.value) for s in samples(text)
                  if s.name == f"{name}_bucket")


class Rig:
    """A Decider as the daemon makes it, and the status parts the daemon would report."""

    def __init__(self, tmp_path: Path, material: Material) -> None:
        self.scope = tmp_path / "scope"
        self.scope.mkdir()
        snap = apply_overrides(default_policy(), mode="enforce", scopes=(str(self.scope),),
                               keys=(str(material.keys["a"]),),
                               state_dir=str(tmp_path / "state"), log_dir=str(tmp_path / "log"))
        self.snap = snap
        self.decider = Decider(PolicyStore(snap), TrustedCache(str(tmp_path / "cache"), "x"))
        self.tally = DecisionTally()
        self.extra: Dict[str, Any] = {}

    def exec(self, path: Path) -> Decision:
        fd = os.open(path, os.O_RDONLY)
        try:
            event = ExecEvent(os.getpid(), os.getppid(), 0, 0, "test", str(path),
                              identity_from_stat(os.fstat(fd)), time.time_ns(), "fanotify-exec")
            d = self.decider.decide(event, fd, Enforcement.FANOTIFY_DENY)
        finally:
            os.close(fd)
        self.tally.add(d)
        return d

    def read(self) -> Readings:
        status: Dict[str, Any] = {
            "state": "ready", "backend": "fanotify-exec", "enforcement": "fanotify-deny",
            "mode": "enforce", "pid": os.getpid(), "version": "test", "uptime_s": 12.0,
            "policy": {"version": self.snap.version, "digest": self.snap.digest,
                       "source": self.snap.source},
            "cache": self.decider.cache.stats().to_json(),
            "decisions": self.decider.stats.to_json(),
            "records": {"decision_log": {"written": 3, "dropped": 2, "queued": 0,
                                         "dropped_by_cause": {"queue-full": 2}},
                        "audit": {"enabled": False, "note": "off"}},
            "console_dropped": 4,
            "sensor": {"observer_dropped": 1, "read_errors": 5, "loop_errors": 0,
                       "overload": 2, "fanotify_stats": {"read_errors": 1}},
            "skipped_backends": [{"backend": "bpf-lsm", "why": "no bpf in lsm="}],
            "warnings": [],
            **self.extra,
        }
        return Readings(status, self.decider.histograms(), self.tally.snapshot(),
                        policy_loaded_at=1700000000.0)

    def text(self) -> str:
        return render(make_registry(self.read)).decode()


def test_histogram_buckets_are_le_and_cumulative() -> None:
    h = LatencyHistogram((10, 100, 1000))
    for v in (0, 10, 11, 100, 5000, 999):
        h.observe(v)
    snap = h.snapshot()
    # 0 and 10 are <= 10; 11 and 100 <= 100; 999 <= 1000; 5000 only in +Inf
    assert snap.cumulative == (2, 4, 5, 6)
    assert snap.count == 6 and snap.sum_us == 0 + 10 + 11 + 100 + 5000 + 999
    with pytest.raises(ValueError):
        LatencyHistogram((10, 10))


def test_decisions_histograms_and_cache_from_a_real_decider(tmp_path: Path,
                                                            material: Material) -> None:
    rig = Rig(tmp_path, material)
    signed = copy_signed(material.bins["app"], rig.scope / "ok", material.private["a"])
    unsigned = copy_signed(material.bins["app"], rig.scope / "bad", None)
    assert rig.exec(signed).allow
    assert not rig.exec(unsigned).allow
    text = rig.text()
    assert value(text, "execguard_decisions_total", verdict="allow", reason="ok",
                 enforcement="none", backend="fanotify-exec") == 1
    assert value(text, "execguard_decisions_total", verdict="deny", reason="no-signature",
                 enforcement="fanotify-deny", backend="fanotify-exec") == 1
    hits, misses = (value(text, "execguard_cache_hits_total"),
                    value(text, "execguard_cache_misses_total"))
    assert hits == 0 and misses == 2

    assert not rig.exec(unsigned).allow  # repeated: the cached denial answers
    text = rig.text()
    assert value(text, "execguard_decisions_total", verdict="deny", reason="no-signature",
                 enforcement="fanotify-deny", backend="fanotify-exec") == 2
    assert value(text, "execguard_cache_hits_total") == 1
    assert value(text, "execguard_cache_misses_total") == 2

    for name, count in (("execguard_decision_duration_seconds", 3),
                        ("execguard_verification_duration_seconds", 2)):
        bs = buckets(text, name)
        assert bs[-1][0] == float("inf") and bs[-1][1] == count
        assert all(a[1] <= b[1] for a, b in zip(bs, bs[1:])), f"{name} not cumulative: {bs}"
        assert value(text, f"{name}_count") == count
        total = value(text, f"{name}_sum")
        assert total is not None and 0 < total < 60
    # the decider's own percentiles and the histogram saw the same decisions
    assert rig.decider.stats.to_json()["latency_us"]["samples"] == 3


def test_agent_policy_drop_and_process_families(tmp_path: Path, material: Material) -> None:
    rig = Rig(tmp_path, material)
    text = rig.text()
    assert value(text, "execguard_up") == 1
    assert value(text, "execguard_agent_info", version="test", backend="fanotify-exec",
                 enforcement="fanotify-deny", mode="enforce") == 1
    assert value(text, "execguard_agent_state", state="ready") == 1
    assert value(text, "execguard_agent_state", state="degraded") == 0
    assert value(text, "execguard_backend_info", backend="fanotify-exec",
                 enforcement="fanotify-deny") == 1
    assert value(text, "execguard_backend_skipped", backend="bpf-lsm") == 1
    assert value(text, "execguard_policy_info", digest=rig.snap.digest, mode="enforce") == 1
    assert value(text, "execguard_policy_version") == rig.snap.version
    assert value(text, "execguard_policy_loaded_timestamp_seconds") == 1700000000.0
    assert value(text, "execguard_records_dropped_total", sink="decision_log",
                 cause="queue-full") == 2
    assert value(text, "execguard_records_written_total", sink="decision_log") == 3
    assert value(text, "execguard_records_written_total", sink="audit") is None  # off
    assert value(text, "execguard_console_dropped_total") == 4
    assert value(text, "execguard_sensor_lost_events_total", backend="fanotify-exec",
                 cause="observer-backlog") == 1
    assert value(text, "execguard_sensor_errors_total", backend="fanotify-exec",
                 kind="read") == 6  # the runner's and a feeder's
    assert value(text, "execguard_sensor_errors_total", backend="fanotify-exec",
                 kind="loop") == 0
    assert value(text, "execguard_sensor_overload_total", backend="fanotify-exec") == 2
    start = value(text, "execguard_start_time_seconds")
    assert start is not None and abs(start - (time.time() - 12)) < 5
    # prefixed, so a textfile never repeats node_exporter's own process_* names
    assert value(text, "execguard_process_resident_memory_bytes")
    assert not [s for s in samples(text) if s.name.startswith("process_")]
    # no bundle, no break-glass: no expiry series, break-glass reads 0
    assert value(text, "execguard_policy_expiry_timestamp_seconds") is None
    assert value(text, "execguard_break_glass_active") == 0


def test_expiry_and_break_glass_are_read_defensively(tmp_path: Path,
                                                     material: Material) -> None:
    from agent.bundle_apply import InForce

    rig = Rig(tmp_path, material)
    now = datetime.now(timezone.utc)
    expires = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    in_force = InForce(7, "sha256:d", now, expires, "/etc/execguard/policy.d/p.json", ("k",))
    until = int(time.time()) + 600
    # the status sections as the bundle manager and the break-glass feature add them
    rig.extra = {"policy_bundle": {"in_force": in_force.to_json(now), "expiry": "ok"},
                 "breakglass": {"active": True, "not_after": time.strftime(
                     "%Y-%m-%dT%H:%M:%SZ", time.gmtime(until))},
                 "state": "alarm"}
    text = rig.text()
    assert value(text, "execguard_policy_expiry_timestamp_seconds") == expires.timestamp()
    assert value(text, "execguard_break_glass_active") == 1
    assert value(text, "execguard_break_glass_expiry_timestamp_seconds") == until
    assert value(text, "execguard_agent_state", state="alarm") == 1
    assert value(text, "execguard_agent_state", state="ready") == 0
    # no bundle in force, break-glass over
    rig.extra = {"policy_bundle": {"in_force": None, "expiry": "none"},
                 "breakglass": {"active": False}}
    text = rig.text()
    assert value(text, "execguard_policy_expiry_timestamp_seconds") is None
    assert value(text, "execguard_break_glass_active") == 0
    assert value(text, "execguard_break_glass_expiry_timestamp_seconds") is None
    # shapes we do not know are ignored, never fatal
    rig.extra = {"policy": {"version": "x", "expires": "next tuesday"}, "breakglass": [1],
                 "sensor": "odd", "records": None, "cache": 3, "state": "weird"}
    text = rig.text()
    assert value(text, "execguard_policy_expiry_timestamp_seconds") is None
    assert value(text, "execguard_policy_version") is None
    assert value(text, "execguard_break_glass_active") == 0
    assert value(text, "execguard_agent_state", state="weird") == 1
    assert policy_expiry({"policy": {"expires": 1893553445}}) == 1893553445.0
    assert break_glass({"breakglass": {"not_after": time.time() - 5}})[0] is False
    assert break_glass({"break_glass": True}) == (True, None)
