"""`execguard run` with the BCC exec sensor: the kill backend (SIGKILL before the new image
runs an instruction) and audit-only (decide and record, block nothing), each scoped to a
tmpfs the test mounts, so the kernel's device scope covers nothing else."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.agent_fixtures import exec_file, running_agent, scoped_tmpfs, wait_for
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture


def test_kill_backend_kills_unsigned_before_it_prints(tmp_path: Path,
                                                      material: Material) -> None:
    with scoped_tmpfs() as scope:
        signed = copy_signed(material.bins["app"], scope / "ok", material.private["a"])
        unsigned = copy_signed(material.bins["app"], scope / "bad", None)
        with running_agent(tmp_path, "--mode", "enforce", "--scope", str(scope), "--key",
                           str(material.keys["a"]), "--backend", "kill",
                           "--audit", "off") as agent:
            status = agent.status()
            assert status["backend"] == "kill" and status["enforcement"] == "post-exec-kill"
            assert "identity" in status["selftest"] or "kill" in status["selftest"]
            wait_for(lambda: agent.status()["prewarm"]["scan_done"])

            ran = exec_file(signed)  # pre-warmed at start: the kernel map allows it
            assert ran.returncode == 0 and ran.stdout == "app\n"

            killed = exec_file(unsigned)
            assert killed.returncode == -signal.SIGKILL and killed.stdout == ""
            rec = agent.wait_decision(str(unsigned))[-1]
            assert rec["decision"] == "deny" and rec["enforcement"] == "post-exec-kill"
            assert rec["reason"] in ("no-signature", "unverified")

            # tampered after it was allowed: the stale stamp makes it unknown, so killed
            with open(signed, "ab") as fh:
                fh.write(b"\0")
            assert exec_file(signed).returncode == -signal.SIGKILL


def test_audit_only_blocks_nothing_and_records_every_decision(tmp_path: Path,
                                                              material: Material) -> None:
    with scoped_tmpfs() as scope:
        signed = copy_signed(material.bins["app"], scope / "ok", material.private["a"])
        unsigned = copy_signed(material.bins["app"], scope / "bad", None)
        with running_agent(tmp_path, "--mode", "enforce", "--scope", str(scope), "--key",
                           str(material.keys["a"]), "--backend", "audit-only",
                           "--audit", "off", expect_state=("degraded",)) as agent:
            assert agent.status()["enforcement"] == "audit-only"
            for _ in range(3):
                assert exec_file(unsigned).stdout == "app\n"
                assert exec_file(signed).stdout == "app\n"
            bad = agent.wait_decision(str(unsigned), 3)
            assert all(d["decision"] == "deny" and d["enforcement"] == "audit-only"
                       for d in bad)
            good = agent.wait_decision(str(signed), 3)
            assert all(d["decision"] == "allow" for d in good)
