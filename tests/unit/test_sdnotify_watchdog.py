"""The service watchdog's two proofs (agent/service.py, agent/heartbeat.py): a loop heartbeat
and a synthetic decision through a real Decider (real policy, real trusted cache)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from agent.cache import TrustedCache
from agent.decide import Decider
from agent.policy import PolicyStore, apply_overrides, default_policy
from agent.policy.load import parse_policy
from agent.service.heartbeat import Heartbeat
from agent.service.watchdog import PROBE_NAME, DecisionProbe, canary_fd, probe_path


def signature_policy(scope: Path, tmp_path: Path) -> Decider:
    """Enforce: every file in ``scope`` needs a signature, so the probe goes through the
    trusted cache and the verifier, not only the rules."""
    text = (f'version = 1\nmode = "enforce"\nscopes = ["{scope}"]\nfallthrough = "deny"\n'
            '[[rules]]\nid = "signed"\naction = "require-signature"\n')
    snap = parse_policy(text.encode(), str(tmp_path / "policy.toml"), "toml")
    cache = TrustedCache(str(tmp_path / "cache.msgpack"), "unused")
    return Decider(PolicyStore(snap), cache)


def test_heartbeat_reports_silence() -> None:
    beat = Heartbeat("fanotify")
    assert beat.check(5.0) is None
    now = time.monotonic() + 10
    why = beat.check(5.0, now)
    assert why is not None and why.startswith("fanotify loop silent for 10.")
    beat.beat()
    assert beat.tid == threading.get_native_id() and beat.check(5.0) is None


def test_probe_path_is_inside_a_scope_when_one_is() -> None:
    snap = apply_overrides(default_policy(), scopes=("/opt/app",))
    assert probe_path(snap) == f"/opt/app/{PROBE_NAME}"
    assert snap.in_scope(probe_path(snap))
    assert probe_path(default_policy()) == f"/{PROBE_NAME}"


def test_canary_is_a_private_copy_in_memory() -> None:
    fd = canary_fd()
    try:
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:execguard-watchdog-canary")
        with open("/usr/bin/true", "rb") as fh:
            assert os.pread(fd, 4, 0) == fh.read(4) == b"\x7fELF"
    finally:
        os.close(fd)


def test_a_probe_decides_through_the_cache_and_verifier_within_the_deadline(
        tmp_path: Path) -> None:
    decider = signature_policy(tmp_path / "scope", tmp_path)
    probe = DecisionProbe(decider, every_s=60)
    try:
        result = probe.run_once()
        assert result.ok, result.detail
        assert result.detail.startswith("deny (no-signature) in ")  # verified: no signature
        assert result.latency_s < 0.5
        assert probe.check(1.0, time.monotonic()) is None
        # the probe's decisions are its own: the agent's exec counters stay untouched
        assert decider.stats.to_json()["decisions"] == {}
        assert probe.decider.stats.to_json()["decisions"] == {"deny": 1}
    finally:
        os.close(probe.fd)


def test_a_wedged_decision_path_is_reported_once_the_window_passes(tmp_path: Path) -> None:
    decider = signature_policy(tmp_path / "scope", tmp_path)
    probe = DecisionProbe(decider, every_s=0.05)
    lock: threading.Lock = decider.cache._lock  # a deadlock on the cache, for real
    lock.acquire()
    try:
        probe.start()
        time.sleep(0.6)
        why = probe.check(0.5, time.monotonic())
        assert why is not None and "no synthetic decision finished" in why
        assert probe.runs == 0  # the first probe is still stuck in the cache lookup
    finally:
        lock.release()
    deadline = time.monotonic() + 5
    while probe.check(0.5, time.monotonic()) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert probe.check(0.5, time.monotonic()) is None  # decisions flow again
    probe.stop()



def test_a_slow_probe_is_progress_a_hung_one_is_not(tmp_path: Path) -> None:
    """Over the decision deadline is slow, not stuck: the probe still proves decisions flow
    (a restart would fail open and make a loaded host no faster). Counted as slow."""
    scope = tmp_path / "scope"
    text = (f'version = 1\nmode = "enforce"\nscopes = ["{scope}"]\nfallthrough = "deny"\n'
            '[limits]\ndecision_deadline_ms = 50\n'
            '[[rules]]\nid = "signed"\naction = "require-signature"\n')
    snap = parse_policy(text.encode(), str(tmp_path / "policy.toml"), "toml")
    decider = Decider(PolicyStore(snap), TrustedCache(str(tmp_path / "cache.msgpack"), "x"))
    probe = DecisionProbe(decider, every_s=60)
    lock: threading.Lock = decider.cache._lock  # busy for 0.3 s: a slow decision, for real
    lock.acquire()
    threading.Timer(0.3, lock.release).start()
    try:
        result = probe.run_once()
        assert not result.ok and result.latency_s >= 0.3
        assert probe.slow == 1 and probe.failures == 0 and probe.to_json()["slow"] == 1
        assert probe.check(1.0, time.monotonic()) is None
        why = probe.check(1.0, time.monotonic() + 5)  # nothing finished since: stuck
        assert why is not None and "no synthetic decision finished" in why
    finally:
        os.close(probe.fd)
