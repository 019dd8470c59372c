"""`execguard run` with the BCC exec sensor: the kill backend (SIGKILL before the new image
runs an instruction) and audit-only (decide and record, block nothing), each scoped to a
tmpfs the test mounts, so the kernel's device scope covers nothing else."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent_fixtures import exec_file, running_agent, scoped_tmpfs, wait_for
from tests.attacks.policies import ALL_SIGNED, write_policy
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


def _script(where: Path, body: str = "echo hi\n") -> Path:
    where.mkdir(parents=True, exist_ok=True)
    script = where / "script.sh"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return script


def test_a_script_in_scope_run_by_an_interpreter_outside_is_recorded(
        tmp_path: Path, material: Material) -> None:
    """sched_process_exec sees the interpreter (/bin/sh, outside the scope), not the script:
    the kernel reports the script's name (EG_MSG_SCRIPT) and the agent judges the script,
    by its absolute name and by a name relative to the caller's working directory. A script
    outside the scope is not recorded."""
    with scoped_tmpfs() as scope, scoped_tmpfs() as outside:
        # a relative name resolves only while its caller lives (docs/sensors.md): the script
        # waits long enough for a loaded agent to look
        script = _script(scope / "s", "sleep 2\necho hi\n")
        other = _script(outside)
        with running_agent(tmp_path, "--mode", "enforce", "--scope", str(scope), "--key",
                           str(material.keys["a"]), "--backend", "audit-only",
                           "--audit", "off", expect_state=("degraded",)) as agent:
            assert exec_file(script).stdout == "hi\n"
            ran = subprocess.run(["./script.sh"], cwd=script.parent, capture_output=True,
                                 text=True, timeout=30)
            assert ran.stdout == "hi\n"
            assert exec_file(other).stdout == "hi\n"
            found = agent.wait_decision(str(script), 2, timeout=30)
            assert all(d["event"]["path"] == str(script) for d in found)
            assert all(d["decision"] == "allow" for d in found), found  # the not-go rule
            assert not [d for d in agent.decisions() if d["event"]["path"] == str(other)]


def test_kill_backend_kills_an_unsigned_script_in_scope_late(tmp_path: Path,
                                                             material: Material) -> None:
    """Under a policy that wants every file signed, an unsigned script exec'd in scope is
    judged after its interpreter started and killed then (post-exec-kill: it may have run
    a while, which the threat model's table says: killed late)."""
    with scoped_tmpfs() as scope:
        script = _script(scope / "s", "sleep 30\necho done\n")
        policy = write_policy(tmp_path / "policy.toml", ALL_SIGNED, scope, material.keys["a"],
                              5000)
        with running_agent(tmp_path, "--policy", str(policy), "--backend", "kill",
                           "--audit", "off") as agent:
            ran = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
            assert ran.returncode == -signal.SIGKILL and "done" not in ran.stdout
            rec = agent.wait_decision(str(script))[-1]
            assert rec["decision"] == "deny" and rec["enforcement"] == "post-exec-kill"
            assert rec["extra"].get("killed_by") == "agent, after verification"


def test_a_script_named_by_descriptor_and_one_under_an_interpreter_in_scope_are_recorded(
        tmp_path: Path, material: Material) -> None:
    """execveat(fd, "", AT_EMPTY_PATH) names the script "/dev/fd/N": the agent reads the
    caller's fd N (its own would be another file). With the interpreter itself in scope the
    script is judged too, beside the interpreter's own exec."""
    with scoped_tmpfs() as scope:
        # a descriptor name resolves only while its caller lives (docs/sensors.md): the
        # script waits long enough for a loaded agent to look
        script = _script(scope / "s", "sleep 2\necho hi\n")
        shell = scope / "bin" / "sh"
        shell.parent.mkdir()
        shell.write_bytes(Path("/bin/dash").read_bytes())
        shell.chmod(0o755)
        inner = scope / "inner" / "script.sh"
        inner.parent.mkdir()
        inner.write_text(f"#!{shell}\necho inner\n")
        inner.chmod(0o755)
        with running_agent(tmp_path, "--mode", "enforce", "--scope", str(scope), "--key",
                           str(material.keys["a"]), "--backend", "audit-only",
                           "--audit", "off", expect_state=("degraded",)) as agent:
            code = ("import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
                    "os.set_inheritable(fd, True); os.execve(fd, ['script'], {})")
            ran = subprocess.run([sys.executable, "-c", code, str(script)],
                                 capture_output=True, text=True, timeout=30)
            assert ran.stdout == "hi\n", ran
            found = agent.wait_decision(str(script), 1, timeout=30)
            assert found[-1]["event"]["path"] == str(script)
            assert exec_file(inner).stdout == "inner\n"
            assert agent.wait_decision(str(inner), 1, timeout=30)
            assert agent.wait_decision(str(shell), 1, timeout=30)
