"""An exec storm against the real agent (BCC sensor backends), scoped to a tmpfs the test owns:
every exec in scope is decided and recorded or counted as a kernel verdict-map hit, the ring
buffer drops nothing, and the agent is
still ``ready`` afterwards. Behaviour only: the rates and the agent's CPU and RSS are
``bench/exec_storm.py``'s business (docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from tests.agent_fixtures import RunningAgent, exec_file, running_agent, scoped_tmpfs
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(180)

PROCS, SECONDS = 8, 8.0

# one worker: exec PATH (argv only, empty environment) until the deadline, then print counts
WORKER = """
import json, os, sys, time
path, end = sys.argv[1], time.monotonic() + float(sys.argv[2])
quiet = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
n = bad = 0
while time.monotonic() < end:
    try:
        _, status = os.waitpid(os.posix_spawn(path, [path], {}, file_actions=quiet), 0)
        bad += status != 0
    except OSError:
        bad += 1
    n += 1
print(json.dumps({"execs": n, "failed": bad}))
"""


@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture


def storm(paths: List[Path], seconds: float) -> Dict[str, int]:
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(p), str(seconds)],
                              stdout=subprocess.PIPE, text=True) for p in paths]
    total = {"execs": 0, "failed": 0}
    try:
        for proc in procs:  # a deadline: a stalled exec fails the test, never hangs it
            out, _ = proc.communicate(timeout=seconds + 60)
            for key, value in json.loads(out.splitlines()[-1]).items():
                total[key] += value
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    return total


def scoped_records(agent: RunningAgent, scope: Path) -> Dict[str, List[Dict[str, Any]]]:
    """Decision records by exec path, for paths under ``scope``, across rotated log files."""
    out: Dict[str, List[Dict[str, Any]]] = {}
    for log in sorted(agent.log_dir.glob("decisions.jsonl*")):
        for line in log.read_text().splitlines():
            if f'"path":"{scope}/' in line:
                rec = json.loads(line)
                out.setdefault(rec["event"]["path"], []).append(rec)
    return out


def settled(agent: RunningAgent, scope: Path, want: int, timeout: float = 30.0
            ) -> Dict[str, List[Dict[str, Any]]]:
    """Wait until ``want`` scoped records are on disk and the recorder's queue is empty."""
    deadline = time.monotonic() + timeout
    while True:
        recs = scoped_records(agent, scope)
        queued = agent.status()["records"].get("decision_log", {}).get("queued", 0)
        if (sum(map(len, recs.values())) >= want and not queued) or \
                time.monotonic() > deadline:
            return recs
        time.sleep(0.2)


# audit-only is not here: it has no kernel verdict map, so every exec wakes the agent and is
# decided in Python (~1 ms of CPU each on this host, docs/performance.md "Exec storm"), and a
# storm overflows its ring buffer. bench/exec_storm.py --backends audit-only shows it.
@pytest.mark.parametrize("backend,mode,enforcement", [
    ("kill", "enforce", "post-exec-kill"),
])
def test_storm_loses_no_decision(tmp_path: Path, material: Material, backend: str, mode: str,
                                 enforcement: str) -> None:
    with scoped_tmpfs() as scope:
        paths = [copy_signed(material.bins["app"], scope / f"w{i}", material.private["a"])
                 for i in range(PROCS)]
        with running_agent(tmp_path, "--mode", mode, "--scope", str(scope), "--key",
                           str(material.keys["a"]), "--backend", backend, "--audit", "off",
                           "--quiet", expect_state=("ready", "degraded")) as agent:
            start = agent.status()
            assert start["backend"] == backend and start["enforcement"] == enforcement
            # the kill backend kills a file it has not verified yet: wait for the scan
            deadline = time.monotonic() + 60
            while not agent.status()["prewarm"]["scan_done"]:
                assert time.monotonic() < deadline, "pre-warm scan never finished"
                time.sleep(0.1)
            for path in paths:  # warm: each copy runs once and is recorded as allowed
                ran = exec_file(path)
                assert ran.returncode == 0 and ran.stdout == "app\n", ran
            warm = settled(agent, scope, PROCS)
            assert sorted(warm) == sorted(map(str, paths))
            before = agent.status()

            made = storm(paths, SECONDS)

            assert made["failed"] == 0 and made["execs"] > PROCS
            # each exec is either decided and recorded, or a kernel verdict-map hit of a file
            # whose allow is already recorded (counted, like fanotify's ignore-marked execs)
            time.sleep(1.0)
            after = agent.status()
            hits = after["sensor"]["kernel_hits"] - before["sensor"]["kernel_hits"]
            recs = settled(agent, scope, PROCS + made["execs"] - hits)
            after = agent.status()
            hits = after["sensor"]["kernel_hits"] - before["sensor"]["kernel_hits"]
            counted = {p: len(r) for p, r in recs.items()}
            assert sum(counted.values()) - PROCS + hits == made["execs"], \
                f"{made['execs']} storm execs, {hits} kernel hits, records per path " \
                f"{counted}; sensor {after['sensor']}; records {after['records']}"
            assert all(r["decision"] == "allow" for rs in recs.values() for r in rs)
            drops = after["sensor"]["sensor"]["drops"] - before["sensor"]["sensor"]["drops"]
            assert drops == 0, f"ring buffer dropped {drops} events: {after['sensor']}"
            assert after["records_dropped"] == 0, after["records"]
            assert after["state"] == start["state"]
            assert after["state"] == ("ready" if backend == "kill" else "degraded")
            assert agent.proc.poll() is None
