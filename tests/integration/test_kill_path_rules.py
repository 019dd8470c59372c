"""The kill backend under path rules (``PolicySnapshot.path_dependent``): no verdict goes
into the kernel, because the kill sensor has no rename hook and a verdict earned in one
directory would follow the file (or its renamed directory) to a path a rule denies. Every
exec in scope is decided by the agent, which kills a denied one after verifying it; what
needs no verdict (a dynamic loader run as a program) is still killed by the kernel.

SAFETY: as tests/integration/test_kill_boundary.py (one enforcing agent, scoped to the
test's tmpfs, for a few seconds; deadlines; teardown in ``finally``).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.agent_fixtures import running_agent, scoped_tmpfs, wait_for
from tests.attacks.harness import LDSO, Result, run_attack
from tests.kill_fixtures import build_tools, keypair, place, scope_policy

pytestmark = pytest.mark.timeout(180)


def test_a_directory_rename_cannot_carry_a_path_verdict(tmp_path: Path) -> None:
    tools = build_tools(tmp_path)
    _private, public = keypair(tmp_path)
    with scoped_tmpfs("32m") as scope:
        allowed = place(tools["payload-static"], scope / "ok" / "kit" / "payload")
        (scope / "denied").mkdir()
        payload_dyn = place(tools["payload-dyn"], scope / "unsigned" / "payload-dyn")
        time.sleep(0.05)
        rule = (f'[[rules]]\nid = "path-allowed"\naction = "allow"\n'
                f'match = {{ paths = ["{scope}/ok/**"] }}')
        policy = scope_policy(tmp_path / "policy.toml", scope, public, [rule])
        with running_agent(tmp_path, "--policy", str(policy), "--backend", "kill",
                           "--audit", "off") as agent:
            sensor = agent.status()["sensor"]
            assert sensor["kernel_judges"].startswith("loader only"), sensor
            for _ in range(3):  # allowed by its path, every time, with no kernel verdict
                ran = run_attack([str(allowed)])
                assert ran.result is Result.RAN and not ran.killed_after_marker, ran
            wait_for(lambda: len(agent.decisions()) >= 3)
            subprocess.run(["mv", "-T", str(scope / "ok" / "kit"), str(scope / "denied" / "kit")],
                           check=True, timeout=10)
            moved = scope / "denied" / "kit" / "payload"
            run_attack([str(moved)])  # judged at its new path: killed by the agent
            rec = agent.wait_decision(str(moved))[-1]
            assert (rec["decision"], rec["enforcement"]) == ("deny", "post-exec-kill"), rec
            assert rec["extra"]["killed_by"] in ("agent, after verification",
                                                 "nobody: it had exited"), rec
            assert run_attack([LDSO, str(payload_dyn)]).result is Result.KILLED  # kernel
            status = agent.status()["sensor"]
            assert status["kernel_hits"] == 0 and status["sensor"]["kills"] >= 1, status
