"""bpf-lsm under a flood of unsigned execs, in the test VM (issue 9, point 6).

Tried on the old code: 60 concurrent unsigned execs made a *signed* exec during the flood
fail with EPERM (its first-seen verification waited behind the flood until the deadline),
and the agent was then killed by its own watchdog. The host has the same test for
fanotify-exec (tests/integration/test_agent_flood.py); here the real BPF LSM program
judges, and the fanotify fill that verifies first-seen files runs behind it, under TCG,
where one verification of a Go binary takes about 2 s.

While ``nobody`` floods the scope with unsigned Go programs (distinct files, each hashed
in full, and one file many times): signed programs verified before the flood run from the
kernel's verdict map, a signed program deployed during the flood runs at its first exec
(its uid's queue is served in turn), every unsigned exec is denied, and the agent is alive
at the end. Behaviour only, no timing: deadlines are generous.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.agent_fixtures import exec_file, running_agent, scoped_tmpfs, wait_for
from tests.flood_fixtures import (
    NOBODY,
    big_unsigned,
    enforce_policy,
    flood_codes,
    signed_copies,
    start_flood,
)
from tests.policy_fixtures import Material, copy_signed

# lockdown does not change how the agent meets a flood: one run carries it (CI budget)
pytestmark = [pytest.mark.timeout(900), pytest.mark.lockdown_runs("none")]

MIB = 1 << 20
DEADLINE_MS = 20000  # ~2 s per verification under TCG, a queue of them ahead


def test_a_flood_of_unsigned_execs_never_denies_the_signed_nor_kills_the_agent(
        tmp_path: Path, vm_material: Material) -> None:
    app, key = vm_material.bins["app"], vm_material.private["a"]
    with scoped_tmpfs("512m") as scope:
        ready = signed_copies(app, scope / "ready", key, 2)  # pre-scanned at start
        policy = enforce_policy(tmp_path / "policy.toml", scope, vm_material.keys["a"],
                                DEADLINE_MS)
        with running_agent(tmp_path, "--policy", str(policy), "--backend", "bpf-lsm",
                           ready_timeout=240) as agent:
            wait_for(lambda: bool(agent.status()["prewarm"]["scan_done"]), timeout=180)
            # made after the pre-scan: each is verified when it is first exec'd
            distinct = [big_unsigned(app, scope / "flood", f"u{i}", 8 * MIB) for i in range(8)]
            same = big_unsigned(app, scope / "flood", "same", 8 * MIB)
            flood = start_flood(distinct + [same] * 8, uid=NOBODY, deadline_s=300)
            try:
                for path in ready:
                    ran = exec_file(path, timeout=60)
                    assert ran.returncode == 0 and ran.stdout == "app\n", ran
                stage = copy_signed(app, tmp_path / "stage", key)
                fresh = scope / "fresh"
                fresh.mkdir()
                shutil.copy(f"{stage}.sig", fresh / "app.sig")  # signature first
                shutil.copy(stage, fresh / "app")
                ran = exec_file(fresh / "app", timeout=120)
                assert ran.returncode == 0 and ran.stdout == "app\n", \
                    f"{ran}\n{agent.output.read_text()[-3000:]}"
            finally:
                codes = flood_codes(flood, timeout=360)
            assert codes == [126] * len(codes), codes
            assert agent.proc.poll() is None, agent.output.read_text()[-3000:]
            reasons = [d["reason"] for d in agent.decisions()
                       if d["event"]["path"] == str(fresh / "app")]
            assert reasons and "decision-timeout" not in reasons, reasons
