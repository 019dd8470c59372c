"""Policy bundles applied to the real agent (fanotify-exec, enforce, tmpfs scope) while
processes exec continuously in the scope: every exec gets its answer (EPERM, as both the old
and the new policy deny these unsigned files), none waits past the deadline, and the decision
log holds exactly one decision per exec, made under the old policy or the new one."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from tests.agent_fixtures import REPO, RunningAgent, running_agent, scoped_tmpfs
from tests.policy_bundle_fixtures import make_bundle, root_keys, write_policy
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(240)

PROCS, GAP_S, MAX_S = 3, 1.0, 60.0

# one worker: exec PATH until STOP exists (or a hard deadline); count answers by kind and
# keep the slowest one
WORKER = """
import errno, json, os, sys, time
path, stop, end = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
quiet = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
n = eperm = ran = other = 0
slowest = 0.0
while not os.path.exists(stop) and time.monotonic() < end:
    t0 = time.monotonic()
    try:
        os.waitpid(os.posix_spawn(path, [path], {}, file_actions=quiet), 0)
        ran += 1
    except OSError as exc:
        if exc.errno == errno.EPERM:
            eperm += 1
        else:
            other += 1
    slowest = max(slowest, time.monotonic() - t0)
    n += 1
print(json.dumps({"execs": n, "eperm": eperm, "ran": ran, "other": other,
                  "slowest_s": slowest}))
"""


@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture


def scoped_records(agent: RunningAgent, scope: Path) -> List[Dict[str, object]]:
    out = []
    for log in sorted(agent.log_dir.glob("decisions.jsonl*")):
        for line in log.read_text().splitlines():
            if f'"path":"{scope}/' in line:
                out.append(json.loads(line))
    return out


def test_apply_under_an_exec_storm_loses_no_decision(tmp_path: Path,
                                                     material: Material) -> None:
    keys = root_keys(tmp_path / "root")
    r = keys.private
    (tmp_path / "drop").mkdir()
    with scoped_tmpfs() as scope:
        paths = [copy_signed(material.bins["app"], scope / f"w{i}", None) for i in range(PROCS)]
        bundles = [
            make_bundle(tmp_path / f"v{v}.bundle",
                        write_policy(tmp_path / f"v{v}.toml", v, scope,
                                     material.keys["a" if v % 2 else "b"]),
                        [r["r1"], r["r2"]])
            for v in (1, 2, 3)]
        with running_agent(tmp_path, "--policy", str(bundles[0]), "--backend",
                           "fanotify-exec", "--audit", "off", "--quiet", "--policy-keys",
                           str(keys.pinned_dir), "--policy-threshold", "2",
                           "--policy-drop-dir", str(tmp_path / "drop")) as agent:
            stop = tmp_path / "stop"
            workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(p), str(stop),
                                         str(MAX_S)], stdout=subprocess.PIPE, text=True)
                       for p in paths]
            try:
                replies = []
                for bundle in bundles[1:]:  # two swaps in the middle of the storm
                    time.sleep(GAP_S)
                    done = subprocess.run(
                        [sys.executable, "-m", "agent", "policy", "apply", str(bundle),
                         "--state-dir", str(agent.state_dir), "--json"],
                        capture_output=True, text=True, timeout=60, cwd=str(REPO))
                    replies.append((done.returncode, json.loads(done.stdout)))
                time.sleep(GAP_S)
                stop.touch()
                totals = {"execs": 0, "eperm": 0, "ran": 0, "other": 0}
                slowest = 0.0
                for w in workers:  # a deadline: a hung exec fails the test, never hangs it
                    out, _ = w.communicate(timeout=MAX_S + 30)
                    counts = json.loads(out.splitlines()[-1])
                    slowest = max(slowest, counts.pop("slowest_s"))
                    for key, value in counts.items():
                        totals[key] += value
            finally:
                for w in workers:
                    if w.poll() is None:
                        w.kill()
                        w.wait(timeout=10)
            assert [rc for rc, _ in replies] == [0, 0], replies
            assert all(reply["applied"] for _, reply in replies)
            assert totals["execs"] > 10 * PROCS, totals
            # every exec was answered, and answered as policy says: no timeout let one run
            assert totals["eperm"] == totals["execs"], totals
            assert slowest < 2.0, f"an exec waited {slowest:.2f} s"

            deadline = time.monotonic() + 30
            records = scoped_records(agent, scope)
            while len(records) < totals["execs"] and time.monotonic() < deadline:
                time.sleep(0.2)
                records = scoped_records(agent, scope)
            time.sleep(0.5)  # nothing more arrives after the count is reached
            records = scoped_records(agent, scope)
            assert len(records) == totals["execs"], (len(records), totals)
            assert all(rec["decision"] == "deny" for rec in records)
            assert {rec["reason"] for rec in records} == {"no-signature"}
            versions = {rec["policy_version"] for rec in records}
            assert versions == {1, 2, 3}, versions
            status = agent.status()
            assert status["policy"]["version"] == 3
            assert status["records_dropped"] == 0
            assert status["state"] == "ready" and agent.proc.poll() is None
