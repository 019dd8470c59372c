"""The agent as `make install` puts it (tests/install_fixtures.py), run from its own venv with
nothing of this checkout importable: it finds the BPF programs it ships, doctor says so, and
its BCC backend loads and enforces. (The unit it installs runs under a real systemd manager in
test_service_systemd.py; the test VM checks that the installed agent chooses bpf-lsm.)"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.agent_fixtures import exec_file, running_agent, scoped_tmpfs, wait_for
from tests.install_fixtures import Installed
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture


def run_installed(installed: Installed, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(installed.execguard), *args], capture_output=True, text=True,
                          timeout=180, cwd=str(cwd), env=installed.env())


def test_the_installed_package_carries_its_bpf_programs_and_doctor_finds_them(
        installed: Installed, tmp_path: Path) -> None:
    done = run_installed(installed, tmp_path, "doctor", "--json")
    assert done.returncode == 0, done.stderr
    rep = json.loads(done.stdout)
    programs = rep["probes"]["bpf-programs"]
    assert programs["ok"], programs
    assert programs["detail"].startswith("5 sources in ") and \
        programs["detail"].split(" in ", 1)[1].startswith(str(installed.prefix) + "/"), programs
    for name, compiled in (("bcc-compile", True), ("send-signal", True)):
        assert rep["probes"][name]["ok"] is compiled, rep["probes"][name]
    reasons = {r["backend"]: r for r in rep["backend"]["reasons"]}
    assert reasons["kill"]["why"] == "available, but fanotify-exec is preferred", reasons["kill"]


def test_the_installed_agent_enforces_with_the_kill_backend(installed: Installed, tmp_path: Path,
                                                            material: Material) -> None:
    with scoped_tmpfs() as scope:
        signed = copy_signed(material.bins["app"], scope / "ok", material.private["a"])
        unsigned = copy_signed(material.bins["app"], scope / "bad", None)
        with running_agent(tmp_path, "--mode", "enforce", "--scope", str(scope), "--key",
                           str(material.keys["a"]), "--backend", "kill", "--audit", "off",
                           execguard=(str(installed.execguard),),
                           env=installed.env()) as agent:
            status = agent.status()
            assert status["backend"] == "kill" and status["state"] == "ready", status
            assert status["enforcement"] == "post-exec-kill"
            wait_for(lambda: agent.status()["prewarm"]["scan_done"])
            ran = exec_file(signed)
            assert ran.returncode == 0 and ran.stdout == "app\n"
            killed = exec_file(unsigned)
            assert killed.returncode == -signal.SIGKILL and killed.stdout == ""
            rec = agent.wait_decision(str(unsigned))[-1]
            assert rec["decision"] == "deny" and rec["enforcement"] == "post-exec-kill"
