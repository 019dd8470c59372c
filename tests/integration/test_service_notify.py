"""The real agent speaking the sd_notify protocol to a real socket in the test's hands.

test_service_systemd.py runs the unit under a real manager; this test needs no manager and
looks at the messages themselves: READY=1 only after the self-test, WATCHDOG=1 while
decisions flow, none while the decision path or the event loop is wedged (a thread frozen
with ptrace, the rest of the process running), pings again once it thaws, STOPPING=1 on
SIGTERM. The abstract socket name ('@...') is the form systemd uses for some managers.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from agent.control import request
from tests.agent_fixtures import RunningAgent, running_agent, scoped_tmpfs, wait_for
from tests.service_fixtures import freeze_thread

pytestmark = [pytest.mark.timeout(120)]

WATCHDOG_S = 2.0


class Listener:
    """What systemd would receive: one dict per datagram, with the time it arrived."""

    def __init__(self) -> None:
        self.name = f"execguard-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.messages: List[Dict[str, str]] = []

    def drain(self, wait_s: float = 0.0) -> List[Dict[str, str]]:
        self.sock.settimeout(wait_s if wait_s > 0 else None)
        self.sock.setblocking(wait_s > 0)
        fresh: List[Dict[str, str]] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, socket.timeout):
                break
            msg = dict(line.split("=", 1) for line in data.decode().splitlines())
            msg["_at"] = repr(time.monotonic())
            fresh.append(msg)
            self.sock.setblocking(False)
        self.messages += fresh
        return fresh

    def wait_for(self, key: str, timeout: float, contains: str = "") -> Dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.drain(0.2):
                if key in msg and contains in msg[key]:
                    return msg
        raise AssertionError(f"no {key} containing {contains!r} within {timeout}s: "
                             f"{self.messages[-10:]}")

    def pings_during(self, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        pings = 0
        while time.monotonic() < deadline:
            pings += sum(1 for m in self.drain(0.2) if m.get("WATCHDOG") == "1")
        return pings


@pytest.fixture(name="notified")
def notified_fixture(tmp_path: Path) -> Iterator[Tuple[Listener, RunningAgent]]:
    listener = Listener()
    saved = {k: os.environ.get(k) for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    os.environ["NOTIFY_SOCKET"] = "@" + listener.name  # running_agent's Popen inherits it
    os.environ["WATCHDOG_USEC"] = str(int(WATCHDOG_S * 1e6))
    os.environ.pop("WATCHDOG_PID", None)
    try:
        with scoped_tmpfs() as scope, running_agent(
                tmp_path, "--mode", "enforce", "--scope", str(scope),
                "--backend", "fanotify-exec") as agent:
            for k, v in saved.items():  # the agent has it; nothing else in this test should
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            yield listener, agent
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        listener.sock.close()


def _tid(agent: RunningAgent, which: str) -> int:
    """The kernel id of the probe thread or of a loop, from the ``service`` control verb
    (known once the thread has run a first time)."""
    deadline = time.monotonic() + 10
    while True:
        service = request(agent.socket, "service", timeout=5)
        if which == "probe":
            tid = service["probe"]["tid"]
        else:
            tid = next(loop["tid"] for loop in service["loops"] if loop["name"] == which)
        if tid is not None or time.monotonic() > deadline:
            return int(tid)
        time.sleep(0.05)


def test_ready_then_pings_then_stopping(notified: Tuple[Listener, RunningAgent]) -> None:
    listener, agent = notified
    ready = listener.wait_for("READY", 10)
    assert ready["STATUS"].startswith("ready: backend fanotify-exec (fanotify-exec: canary "
                                      "denied with EPERM, then allowed)")
    assert listener.pings_during(WATCHDOG_S * 1.5) >= 2
    os.kill(agent.proc.pid, signal.SIGTERM)
    stopping = listener.wait_for("STOPPING", 10)
    assert stopping["STATUS"] == "stopping: stopped by signal"
    assert agent.proc.wait(20) == 0


def test_no_pings_while_decisions_are_wedged_and_pings_after(
        notified: Tuple[Listener, RunningAgent]) -> None:
    listener, agent = notified
    listener.wait_for("READY", 10)
    frozen = freeze_thread(_tid(agent, "probe"))
    try:
        status = listener.wait_for("STATUS", WATCHDOG_S * 3, contains="unhealthy")
        assert "no synthetic decision finished" in status["STATUS"]
        assert listener.pings_during(WATCHDOG_S * 1.5) == 0
        assert agent.status()["state"] == "ready"  # the process is alive all along
    finally:
        frozen.release()
    listener.wait_for("WATCHDOG", WATCHDOG_S * 2)
    wait_for(lambda: "decisions flow again" in agent.output.read_text(), timeout=5)


def test_a_silent_event_loop_stops_the_pings(notified: Tuple[Listener, RunningAgent]) -> None:
    listener, agent = notified
    listener.wait_for("READY", 10)
    # Our pings stop within half an interval (1 s) of the fanotify loop's silence; the
    # responder's own watchdog process then kills the agent (3 s running-but-silent), so
    # pending execs are allowed (fail-open) and systemd restarts it.
    frozen = freeze_thread(_tid(agent, "fanotify"))
    try:
        status = listener.wait_for("STATUS", WATCHDOG_S * 3, contains="unhealthy")
        assert "fanotify loop silent for" in status["STATUS"]
        assert agent.proc.wait(15) == -signal.SIGKILL
    finally:
        frozen.release()
