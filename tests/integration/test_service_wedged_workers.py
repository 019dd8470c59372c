"""The service watchdog when every fanotify decide worker is stuck but the loop still turns.

The loop then answers each exec with on_timeout and keeps beating, and the synthetic probe
decides on a thread of its own: neither of the two proofs saw such a wedge, so systemd kept
being pinged while no exec was judged. Here the workers are frozen for real (ptrace), the
rest of the agent runs, and the exec in the scope is real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from agent.control import request
from tests.agent_fixtures import RunningAgent, running_agent, scoped_tmpfs, wait_for
from tests.integration.test_service_notify import WATCHDOG_S, Listener
from tests.service_fixtures import Frozen, freeze_thread, restore_env

pytestmark = [pytest.mark.timeout(120)]
NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@pytest.fixture(name="agent_in_scope")
def agent_in_scope_fixture(tmp_path: Path) -> Iterator[Tuple[Listener, RunningAgent, Path]]:
    listener = Listener()
    saved = {k: os.environ.get(k) for k in NOTIFY_VARS}
    os.environ["NOTIFY_SOCKET"] = "@" + listener.name  # running_agent's Popen inherits it
    os.environ["WATCHDOG_USEC"] = str(int(WATCHDOG_S * 1e6))
    os.environ.pop("WATCHDOG_PID", None)
    try:
        # no pre-warming: a pre-verified allow is answered on the loop from memory, and
        # this test needs an exec that only a decide worker can answer
        with scoped_tmpfs() as scope, running_agent(
                tmp_path, "--mode", "enforce", "--scope", str(scope),
                "--backend", "fanotify-exec", "--no-prewarm") as agent:
            restore_env(saved)
            yield listener, agent, scope
    finally:
        restore_env(saved)
        listener.sock.close()


def _worker_tids(agent: RunningAgent) -> List[int]:
    deadline = time.monotonic() + 10
    while True:
        workers = request(agent.socket, "service", timeout=5)["workers"]
        if workers["tids"] or time.monotonic() > deadline:
            return [int(t) for t in workers["tids"]]
        time.sleep(0.05)


def test_no_pings_while_every_decide_worker_is_stuck(
        agent_in_scope: Tuple[Listener, RunningAgent, Path]) -> None:
    listener, agent, scope = agent_in_scope
    listener.wait_for("READY", 10)
    assert listener.pings_during(WATCHDOG_S) >= 1
    exe = scope / "true-copy"
    shutil.copy("/usr/bin/true", exe)
    tids = _worker_tids(agent)
    assert tids
    frozen: List[Frozen] = [freeze_thread(t) for t in tids]
    try:
        # answered by the loop's on_timeout (deny, the deadline is 0.5 s), never decided
        with pytest.raises(PermissionError):
            subprocess.run([str(exe)], timeout=20, check=False)
        assert request(agent.socket, "service", timeout=5)["workers"]["stalled_s"] > 0
        status = listener.wait_for("STATUS", WATCHDOG_S * 3, contains="unhealthy")
        assert "decide workers stuck" in status["STATUS"], status
        assert listener.pings_during(WATCHDOG_S * 1.5) == 0
        assert agent.status()["state"] == "ready"  # the process is alive all along
    finally:
        for f in frozen:
            f.release()
    listener.wait_for("WATCHDOG", WATCHDOG_S * 3)
    wait_for(lambda: "decisions flow again" in agent.output.read_text(), timeout=5)
