"""packaging/execguard.service passes `systemd-analyze verify`, and `make install` /
`make uninstall` into a DESTDIR put and remove what docs/service.md says.

`systemd-analyze verify` also checks that every Exec*= program exists. The shipped unit
names /opt/execguard/bin/execguard, which exists only after `make install`; so the shipped
file is verified with that one complaint allowed and named, a copy pointing at this
checkout's execguard must verify clean, and the unit `make install` wrote into a DESTDIR
must verify clean against the venv it installed there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging" / "execguard.service"
INSTALLED = "/opt/execguard/bin/execguard"
VENV_EXECGUARD = Path(sys.executable).parent / "execguard"


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_the_shipped_unit_verifies_but_for_the_not_yet_installed_binary() -> None:
    result = verify(UNIT)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if line]
    if os.path.exists(INSTALLED):
        assert result.returncode == 0, complaints
        return
    assert complaints == [f"{UNIT.name}: Command {INSTALLED} is not executable: "
                          "No such file or directory"]


def test_the_unit_verifies_clean_with_an_existing_execguard(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert text.count(f"ExecStart={INSTALLED} ") == 1
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={VENV_EXECGUARD} "))
    result = verify(copy)
    assert result.returncode == 0 and not result.stdout and not result.stderr, result


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_make_install_and_uninstall_into_a_destdir(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    prefix = "/opt/execguard-test"
    env = {**os.environ, "DESTDIR": str(dest), "PREFIX": prefix}
    subprocess.run(["./scripts/install.sh", "install"], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=540)
    venv = dest / prefix.lstrip("/")
    unit = dest / "etc/systemd/system/execguard.service"
    assert (dest / "etc/default/execguard").read_text() == \
        (REPO / "packaging/execguard.default").read_text()
    assert (dest / "etc/execguard/keys").is_dir()
    assert (venv / "share/doc/execguard/service.md").exists()
    text = unit.read_text()
    assert f"ExecStart={prefix}/bin/execguard run $EXECGUARD_OPTS" in text
    assert "/opt/execguard/" not in text.replace(f"{prefix}/", "")
    # the venv names its final place, not the staging directory
    head = (venv / "bin/execguard").read_text().splitlines()[0]
    assert head == f"#!{prefix}/bin/python3", head
    assert str(dest) not in (venv / "bin/activate").read_text()
    # it runs, from its staged place, with the distro's bcc importable
    ran = subprocess.run([str(venv / "bin/python3"), "-c",
                          "import agent.cli, bcc, sys; print(agent.cli.__file__)"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith(str(venv)), "the installed copy, not this checkout"
    # with the BPF programs its BCC backends compile at start (package data)
    programs = Path(ran.stdout.strip()).parents[1] / "sensors" / "bpf" / "programs"
    assert sorted(p.name for p in programs.iterdir()) == [
        "README.md", "events.h", "exec_fmod_ret.c", "exec_lsm.c", "exec_sensor.c",
        "exec_verdict.h"]
    # the installed unit verifies clean against what was installed
    staged = tmp_path / "verify" / unit.name
    staged.parent.mkdir()
    staged.write_text(text.replace(f"{prefix}/bin/execguard", str(venv / "bin/execguard")))
    result = verify(staged)
    assert result.returncode == 0 and not result.stdout and not result.stderr, result
    # an admin's options survive a reinstall
    (dest / "etc/default/execguard").write_text('EXECGUARD_OPTS="--quiet"\n')
    subprocess.run(["./scripts/install.sh", "uninstall"], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=60)
    assert not unit.exists() and not venv.exists()
    assert (dest / "etc/default/execguard").read_text() == 'EXECGUARD_OPTS="--quiet"\n'
