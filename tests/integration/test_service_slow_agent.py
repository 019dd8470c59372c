"""Neither watchdog kills an agent that is slow but moving (issue 9, point 6).

The real agent (fanotify-exec, enforce) runs in a cgroup of its own capped at a few percent
of one CPU, a slow host as under qemu, while its decide workers hash large unsigned files:
each decision takes seconds, longer than the systemd watchdog's window, and execs wait for
them. The workers keep using CPU, so that is progress: systemd keeps being pinged and the
fanotify watchdog process leaves the agent alive. Wedged agents (a frozen event loop, a
frozen probe, every decide worker frozen) are still stopped: test_service_notify.py and
test_service_wedged_workers.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator, Tuple

import pytest

from agent.control import request
from tests.agent_fixtures import RunningAgent, running_agent, scoped_tmpfs, wait_for
from tests.flood_fixtures import big_unsigned, cpu_limited, enforce_policy, flood_codes, start_flood
from tests.integration.test_service_notify import Listener
from tests.policy_fixtures import Material, material_fixture  # noqa: F401
from tests.service_fixtures import restore_env

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="fanotify permission events need root"),
    pytest.mark.timeout(240),
]
NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
MIB = 1 << 20
CPU_PERCENT = 8  # ~28 MB/s of hashing per busy worker: each 224 MiB file takes ~8 s
WATCHDOG_S = 3.0  # window W/2 = 1.5 s: room for the probe on a host loaded by others too
SLOW_S = 2 * WATCHDOG_S  # how long decisions stay unfinished here: 4 windows


@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture


@pytest.fixture(name="notified")
def notified_fixture(tmp_path: Path, material: Material
                     ) -> Iterator[Tuple[Listener, RunningAgent, Path]]:
    listener = Listener()
    saved = {k: os.environ.get(k) for k in NOTIFY_VARS}
    os.environ["NOTIFY_SOCKET"] = "@" + listener.name  # running_agent's Popen inherits it
    os.environ["WATCHDOG_USEC"] = str(int(WATCHDOG_S * 1e6))
    os.environ.pop("WATCHDOG_PID", None)
    try:
        with scoped_tmpfs("1g") as scope:
            # a deadline of 1 s: decisions run past it and past the window, execs wait
            policy = enforce_policy(tmp_path / "policy.toml", scope, material.keys["a"], 1000)
            with running_agent(tmp_path, "--policy", str(policy), "--backend",
                               "fanotify-exec", "--audit", "off", "--no-prewarm") as agent:
                restore_env(saved)
                yield listener, agent, scope
    finally:
        restore_env(saved)
        listener.sock.close()


def test_slow_decisions_are_not_a_wedge(notified: Tuple[Listener, RunningAgent, Path],
                                        material: Material) -> None:
    listener, agent, scope = notified
    listener.wait_for("READY", 10)
    assert listener.pings_during(WATCHDOG_S) >= 1
    # at a few percent of a CPU each of these takes seconds to hash, four workers at once
    big = [big_unsigned(material.bins["app"], scope / "big", f"u{i}", 224 * MIB)
           for i in range(8)]
    with cpu_limited(agent.proc.pid, CPU_PERCENT):
        execs = start_flood(big)
        try:
            wait_for(lambda: agent.status()["sensor"]["timeout"] >= 1, timeout=10)
            started = time.monotonic()  # execs wait past the deadline for slow decisions
            pings = listener.pings_during(SLOW_S)
            busy = request(agent.socket, "service", timeout=10)
            assert busy["pinging"] and busy["why_not"] is None, busy
            stats = agent.status()["sensor"]
        finally:
            codes = flood_codes(execs)
    # slow for real: after SLOW_S (past the window) decisions were still running
    assert stats["decided"] + stats["late"] < len(big), stats
    assert pings >= SLOW_S / (WATCHDOG_S / 4) - 3, f"{pings} pings in {SLOW_S}s"
    unhealthy = [m for m in listener.messages
                 if "unhealthy" in m.get("STATUS", "") and float(m["_at"]) >= started]
    assert not unhealthy, unhealthy
    assert set(codes) == {126}, codes  # the deadline's deny, or decided: never run
    assert agent.proc.poll() is None  # the fanotify watchdog left it alone too
    assert agent.status()["state"] == "ready"
