"""The console's periodic status line (agent/daemon.py ``status_line``): what journald keeps
from an agent under systemd, so it must never print Python's ``None``."""

from __future__ import annotations

from typing import Any, Dict

from agent.daemon import status_line


def answer(**over: Any) -> Dict[str, Any]:
    s: Dict[str, Any] = {
        "state": "ready", "backend": "fanotify-exec", "enforcement": "fanotify-deny",
        "policy": {"version": None}, "records_dropped": 0,
        "decisions": {"decisions": {}, "latency_us": {"p50": None, "p99": None}},
        "cache": {"entries": 0, "hit_rate": None},
    }
    s.update(over)
    return s


def test_a_fresh_agent_prints_dashes_for_what_it_does_not_know_yet() -> None:
    line = status_line(answer())
    assert "None" not in line
    assert line == ("status: ready backend=fanotify-exec enforcement=fanotify-deny policy=- "
                    "decisions=0 deny=0 would-deny=0 cache=0 hit-rate=0.00 p50=- p99=- "
                    "dropped=0")


def test_a_busy_agent_prints_its_figures() -> None:
    line = status_line(answer(
        policy={"version": 7}, breakglass={"active": True, "remaining_s": 120},
        decisions={"decisions": {"allow": 5, "deny": 2}, "latency_us": {"p50": 41, "p99": 900}},
        cache={"entries": 3, "hit_rate": 0.5}))
    assert line == ("status: ready backend=fanotify-exec enforcement=fanotify-deny policy=v7 "
                    "BREAK-GLASS=120s-left decisions=7 deny=2 would-deny=0 cache=3 "
                    "hit-rate=0.50 p50=41us p99=900us dropped=0")
