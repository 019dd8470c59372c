"""The Vagrant matrix, checked offline: ``vagrant validate``, shellcheck and the runners' plans.

The boxes cannot be downloaded here, so nothing boots. What runs is real: Debian's Vagrant
2.3.4 with vagrant-libvirt validates the Vagrantfile, shellcheck reads every provisioning
script, and the runners print their plans. scripts/vagrant-validate.sh installs the tools
from Debian when they are missing; it never skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
VAGRANT_DIR = ROOT / "vagrant"
RUN_SUITE = VAGRANT_DIR / "run-suite.sh"
MATRIX = VAGRANT_DIR / "matrix.sh"
LOCKDOWN = Path("/sys/kernel/security/lockdown")
RUN_SUITE_IN_BOX = "/vagrant/vagrant/run-suite.sh"


def _run(cmd: List[str], env: Optional[Dict[str, str]] = None, timeout: int = 120,
         cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def validated() -> subprocess.CompletedProcess[str]:
    # up to 10 min: the first run may install vagrant, vagrant-libvirt and shellcheck
    return _run([str(ROOT / "scripts" / "vagrant-validate.sh")], timeout=600)


def test_vagrant_validate_and_shellcheck_pass(validated: subprocess.CompletedProcess[str]) -> None:
    out = validated.stdout + validated.stderr
    assert validated.returncode == 0, out
    assert "Vagrantfile validated successfully." in out
    assert "shellcheck clean:" in out
    assert "vagrant-validate: OK" in out


def test_shellcheck_covers_every_script(validated: subprocess.CompletedProcess[str]) -> None:
    line = next(ln for ln in validated.stderr.splitlines() if "shellcheck clean:" in ln)
    checked = set(line.split("shellcheck clean:", 1)[1].split())
    scripts = {str(p.relative_to(ROOT)) for p in (VAGRANT_DIR / "provision").glob("*.sh")}
    scripts |= {"vagrant/run-suite.sh", "vagrant/matrix.sh", "scripts/vagrant-validate.sh"}
    assert scripts <= checked, scripts - checked
    assert {"centos7.sh", "ubuntu2204.sh", "rocky9.sh"} <= {Path(s).name for s in scripts}


def test_validate_rejects_a_bad_setting(validated: subprocess.CompletedProcess[str],
                                        tmp_path: Path) -> None:
    """validate really reads the provider and provisioner settings: a typo fails it."""
    assert validated.returncode == 0
    copy = tmp_path / "vagrant"
    shutil.copytree(VAGRANT_DIR, copy, ignore=shutil.ignore_patterns(".vagrant"))
    vf = copy / "Vagrantfile"
    text = vf.read_text()
    assert "lv.memory = MEMORY" in text and "reboot: true, run: \"never\"" in text
    vf.write_text(text.replace("lv.memory = MEMORY", "lv.memory = MEMORY\n    lv.memroy = 1")
                  .replace('reboot: true, run: "never"', 'reboot: true, rerun: "never"', 1))
    res = _run(["vagrant", "validate"], cwd=copy,
               env={"VAGRANT_DEFAULT_PROVIDER": "libvirt",
                    "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot")})
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "memroy" in out and "rerun" in out, out


def _fake_securityfs(tmp_path: Path, lockdown: Optional[str]) -> Path:
    fs = tmp_path / "securityfs"
    fs.mkdir()
    if lockdown is not None:
        (fs / "lockdown").write_text(lockdown + "\n")
    return fs


def test_run_suite_plan_runtime(tmp_path: Path) -> None:
    fs = _fake_securityfs(tmp_path, "[none] integrity confidentiality")
    res = _run([str(RUN_SUITE), "--dry-run"],
               env={"EXECGUARD_SECURITYFS": str(fs), "EXECGUARD_BOX": "rocky9"})
    assert res.returncode == 0, res.stderr
    assert "doctor expects: bpf-lsm" in res.stderr
    assert "tests/vm/guest.sh /var/tmp/execguard-results/runtime runtime" in res.stderr
    assert "modes: none integrity confidentiality" in res.stderr
    assert (fs / "lockdown").read_text() == "[none] integrity confidentiality\n"


def test_run_suite_plan_boot(tmp_path: Path) -> None:
    fs = _fake_securityfs(tmp_path, "none integrity [confidentiality]")
    res = _run([str(RUN_SUITE), "--dry-run", "--phase", "boot"],
               env={"EXECGUARD_SECURITYFS": str(fs), "EXECGUARD_BOX": "ubuntu2204"})
    assert res.returncode == 0, res.stderr
    assert "tests/vm/guest.sh /var/tmp/execguard-results/boot boot" in res.stderr


def test_run_suite_runtime_needs_a_none_boot(tmp_path: Path) -> None:
    fs = _fake_securityfs(tmp_path, "none [integrity] confidentiality")
    res = _run([str(RUN_SUITE), "--dry-run"],
               env={"EXECGUARD_SECURITYFS": str(fs), "EXECGUARD_BOX": "rocky9"})
    assert res.returncode == 1
    assert "booted at lockdown integrity" in res.stderr


def test_run_suite_plan_degraded_tier(tmp_path: Path) -> None:
    """CentOS 7: no lockdown file, so only the tier checks, which expect a fanotify-open or
    audit-only backend; the suite itself is not run there."""
    fs = _fake_securityfs(tmp_path, None)
    res = _run([str(RUN_SUITE), "--dry-run"],
               env={"EXECGUARD_SECURITYFS": str(fs), "EXECGUARD_BOX": "centos7"})
    assert res.returncode == 0, res.stderr
    assert "platform-tier checks only" in res.stderr
    assert "doctor expects: fanotify-open audit-only" in res.stderr
    assert "guest.sh" not in res.stderr


@pytest.mark.parametrize("marked", [False, True], ids=["no-box-marker", "no-cmdline-marker"])
def test_run_suite_refuses_outside_a_box(tmp_path: Path, marked: bool) -> None:
    """Without --dry-run the runner (whose guest.sh raises lockdown) refuses on this host:
    no provisioned-box marker, or no execguard.vmtest=1 on the kernel command line."""
    assert "execguard.vmtest=1" not in Path("/proc/cmdline").read_text().split()
    state = tmp_path / "state"
    state.mkdir()
    if marked:
        (state / "box").write_text("rocky9\n")
    before = LOCKDOWN.read_text() if LOCKDOWN.exists() else None
    res = _run([str(RUN_SUITE), "--results", str(tmp_path / "results")],
               env={"EXECGUARD_STATE": str(state)})
    assert res.returncode != 0
    assert "refusing" in res.stderr or "not on the kernel command line" in res.stderr, res.stderr
    assert not (tmp_path / "results").exists()
    assert (LOCKDOWN.read_text() if LOCKDOWN.exists() else None) == before


def test_matrix_dry_run(tmp_path: Path) -> None:
    res = _run([str(MATRIX), "--dry-run", "--provider", "virtualbox"],
               env={"EXECGUARD_VAGRANT_RESULTS": str(tmp_path / "results")})
    assert res.returncode == 0, res.stderr
    err = res.stderr
    for m in ("centos7", "ubuntu2204", "rocky9"):
        assert f"vagrant up {m} --provider virtualbox" in err
        assert f"vagrant ssh {m} --no-tty -c sudo {RUN_SUITE_IN_BOX} --phase runtime" in err
        assert f"vagrant destroy -f {m}" in err
    assert "vagrant provision rocky9 --provision-with lockdown-boot" in err
    assert "vagrant provision centos7 --provision-with lockdown-boot" not in err
    assert "centos7: no lockdown in this kernel" in err
    assert not (tmp_path / "results").exists()
