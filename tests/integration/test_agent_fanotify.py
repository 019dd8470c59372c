"""`execguard run` with the fanotify backend in enforce mode, scoped to a tmpfs the test owns:
real fanotify, real auditd, real signed Go binaries (docs/architecture.md decision 5 order)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.agent_fixtures import cli, exec_file, running_agent, scoped_tmpfs, wait_for
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401
from tests.record_fixtures import auditd_running, run_tool, wait_in_log

pytestmark = pytest.mark.timeout(240)



@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture


def test_enforce_allows_signed_denies_unsigned_and_tampered(tmp_path: Path,
                                                            material: Material) -> None:
    with auditd_running() as auditd, scoped_tmpfs() as scope:
        signed = copy_signed(material.bins["app"], scope / "ok", material.private["a"])
        unsigned = copy_signed(material.bins["app"], scope / "bad", None)
        with running_agent(tmp_path, "--mode", "enforce", "--scope", str(scope), "--key",
                           str(material.keys["a"]), "--backend", "fanotify-exec") as agent:
            status = agent.status()
            assert status["backend"] == "fanotify-exec"
            assert status["enforcement"] == "fanotify-deny"

            ran = exec_file(signed)
            assert ran.returncode == 0 and ran.stdout == "app\n"

            denied = exec_file(unsigned)
            assert denied.returncode == 126 and "Operation not permitted" in denied.stderr
            record = agent.wait_decision(str(unsigned))[-1]
            assert record["decision"] == "deny" and record["reason"] == "no-signature"
            assert record["enforcement"] == "fanotify-deny" and record["rule_id"] == "go-signed"
            wait_in_log(auditd.log_file, f'path="{unsigned}"')
            found = run_tool("ausearch", "-m", "ANOM_EXEC", "-i", "-if", auditd.log_file)
            assert str(unsigned) in found and "fanotify-deny" in found
            # aureport lists it with the exec'ing program (this test's python) as the subject
            report = run_tool("aureport", "--anomaly", "-if", auditd.log_file)
            assert "ANOM_EXEC" in report and os.path.realpath(sys.executable) in report

            # tampered after it was verified (and ignore-marked: the open for write took the
            # mark off first): asked again, denied
            with open(signed, "ab") as fh:
                fh.write(b"\0")
            assert exec_file(signed).returncode == 126
            assert agent.wait_decision(str(signed), 2)[-1]["reason"] == "bad-signature"

            # deployed while the agent runs: signature first, then the binary
            fresh_dir = scope / "fresh"
            fresh_dir.mkdir()
            staged = copy_signed(material.bins["app"], tmp_path / "stage", material.private["a"])
            warmed = agent.status()["prewarm"]["verified"]
            shutil.copy(f"{staged}.sig", fresh_dir / "app.sig")
            # written with its final mode: a chmod after the close would change its ctime,
            # and a changed file is (rightly) verified again at exec
            fd = os.open(fresh_dir / "app", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
            with os.fdopen(fd, "wb") as out:
                out.write(staged.read_bytes())
            wait_for(lambda: agent.status()["prewarm"]["verified"] > warmed)
            first = exec_file(fresh_dir / "app")
            assert first.returncode == 0 and first.stdout == "app\n"
            rec = agent.wait_decision(str(fresh_dir / "app"))[0]
            # pre-warmed, but on a tmpfs a stamp does not prove the bytes (a write through
            # a mapping keeps it): the exec is answered from the runner's memo when the
            # file had settled when it was pre-warmed, else decided from its bytes again
            # (docs/fanotify.md, "Ignore marks, and writes through a mapping")
            assert rec["decision"] == "allow" and rec["source"] in ("cache", "verify")

            # outside the scope nothing is asked
            assert exec_file(Path("/bin/true")).returncode == 0
            assert not [d for d in agent.decisions() if d["event"]["path"] == "/usr/bin/true"]


def test_monitor_mode_reports_but_never_blocks(tmp_path: Path, material: Material) -> None:
    with scoped_tmpfs() as scope:
        unsigned = copy_signed(material.bins["app"], scope, None)
        with running_agent(tmp_path, "--mode", "monitor", "--scope", str(scope), "--key",
                           str(material.keys["a"]), "--backend", "fanotify-exec",
                           "--audit", "off") as agent:
            assert agent.status()["enforcement"] == "monitor"
            assert exec_file(unsigned).returncode == 0
            rec = agent.wait_decision(str(unsigned))[-1]
            assert rec["decision"] == "deny" and rec["enforcement"] == "monitor"

            # the operator's view: `status` over the control socket, `denials` over the log
            st = cli("status", "--state-dir", str(agent.state_dir), "--json")
            assert st.returncode == 0
            status = json.loads(st.stdout)
            for key in ("state", "backend", "enforcement", "policy", "cache", "decisions",
                        "records_dropped", "sensor"):
                assert key in status
            assert status["decisions"]["decisions"]["would-deny"] >= 1
            listed = cli("denials", "--log-dir", str(agent.log_dir), "--json")
            assert listed.returncode == 0 and str(unsigned) in listed.stdout
            record_id = json.loads(listed.stdout.splitlines()[-1])["id"]
            explained = cli("denials", "--log-dir", str(agent.log_dir), "explain", record_id)
            assert explained.returncode == 0 and "execguard verify" in explained.stdout
        gone = cli("status", "--state-dir", str(agent.state_dir))
        assert gone.returncode == 3 and "no agent" in gone.stderr


def test_agent_killed_fails_open(tmp_path: Path, material: Material) -> None:
    with scoped_tmpfs() as scope:
        unsigned = copy_signed(material.bins["app"], scope, None)
        with running_agent(tmp_path, "--mode", "enforce", "--scope", str(scope), "--key",
                           str(material.keys["a"]), "--backend", "fanotify-exec",
                           "--audit", "off") as agent:
            assert exec_file(unsigned).returncode == 126
            agent.proc.send_signal(signal.SIGKILL)
            agent.proc.wait(timeout=10)
            assert exec_file(unsigned, timeout=10).returncode == 0


def test_agent_stopped_never_holds_an_exec_past_the_deadline(tmp_path: Path,
                                                             material: Material) -> None:
    with scoped_tmpfs() as scope:
        unsigned = copy_signed(material.bins["app"], scope, None)
        with running_agent(tmp_path, "--mode", "enforce", "--scope", str(scope), "--key",
                           str(material.keys["a"]), "--backend", "fanotify-exec",
                           "--audit", "off") as agent:
            agent.proc.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            result = exec_file(unsigned, timeout=15)
            waited = time.monotonic() - started
            # the watchdog killed the stalled agent; the kernel then allowed the exec
            assert result.returncode == 0, result
            assert waited < 5.0, f"exec waited {waited:.1f} s"
            assert agent.proc.wait(timeout=10) == -signal.SIGKILL
