"""`make deb` and `make rpm` as a fleet deploys them. The .deb is built from this tree, then
installed with apt into a fresh Debian root made by debootstrap (so apt resolves the
package's own Depends from Debian's archive), where the installed `execguard doctor` runs; a
reinstall (dpkg's upgrade path) keeps the state and an edited conffile, a removal keeps them,
a purge removes them. The .rpm is built with rpmbuild from packaging/rpm/execguard.spec;
its contents and scriptlets are checked, and rpm installs, upgrades and erases it in the
same root after the .deb is purged (``--nodeps``: that root's packages are dpkg's; the
python3 and bcc the RPM needs are there from the .deb's install).

Everything that mounts runs in a private mount namespace (``unshare``): /proc, /sys and /dev
are visible in the root only there and vanish with it, whatever happens. The root has no
running systemd (its /run is empty), so the maintainer scripts take their no-systemd branch
here; the unit itself runs under a real systemd in test_service_systemd.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Dict

import pytest

from tests.agent_fixtures import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# both packages' lives start the same way: the chroot's mounts (in the caller's private
# mount namespace), and helpers to edit what an upgrade must keep and to list what is left
ROOT_SETUP = r"""
set -eu
R=$1; PKG=$2; OUT=$3
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount --bind /dev "$R/dev"
# what an upgrade must keep: the agent's state (cache, anti-rollback version, spent tokens)
# and an edited conffile
edit_state() {
    mkdir -p "$R/var/lib/execguard"
    echo '{"version": 7}' >"$R/var/lib/execguard/policy-version.json"
    echo '{"version": 7}' >"$R/var/lib/execguard/applied.json"
    echo '{"event": "applied"}' >"$R/var/lib/execguard/breakglass.jsonl"
    sed -i 's/^EXECGUARD_OPTS=.*/EXECGUARD_OPTS="--quiet --mine"/' "$R/etc/default/execguard"
}
state() { ls "$R/opt/execguard/bin/execguard" "$R/etc/default/execguard" \
          "$R/var/lib/execguard/policy-version.json" 2>/dev/null || true; }
"""

IN_ROOT = ROOT_SETUP + r"""
cp "$PKG" "$R/tmp/execguard.deb"
export DEBIAN_FRONTEND=noninteractive
in_root() { chroot "$R" "$@"; }
in_root apt-get update -qq
in_root apt-get install -y -qq --no-install-recommends /tmp/execguard.deb >"$OUT/install.log" 2>&1
cp "$R/opt/execguard/pyvenv.cfg" "$OUT/pyvenv.cfg"
rc=0
in_root /opt/execguard/bin/execguard doctor --json >"$OUT/doctor.json" 2>"$OUT/doctor.err" \
    || rc=$?
echo "$rc" >"$OUT/doctor.rc"
edit_state
# the same version again runs dpkg's upgrade path (prerm upgrade, postinst configure)
in_root dpkg -i --force-confold /tmp/execguard.deb >"$OUT/upgrade.log" 2>&1
{ echo "== upgraded"; state; grep '^EXECGUARD_OPTS=' "$R/etc/default/execguard"; } >"$OUT/life"
in_root dpkg -r execguard >"$OUT/remove.log" 2>&1
{ echo "== removed"; state; } >>"$OUT/life"
in_root dpkg -P execguard >"$OUT/purge.log" 2>&1
{ echo "== purged"; state; ls "$R/var/lib/execguard" 2>/dev/null || true; } >>"$OUT/life"
"""

RPM_IN_ROOT = ROOT_SETUP + r"""
rpm --root "$R" --initdb
rpm --root "$R" -i --nodeps "$PKG" >"$OUT/rpm-install.log" 2>&1
rc=0
chroot "$R" /opt/execguard/bin/execguard doctor --json >"$OUT/rpm-doctor.json" \
    2>"$OUT/rpm-doctor.err" || rc=$?
echo "$rc" >"$OUT/rpm-doctor.rc"
edit_state
rpm --root "$R" -U --replacepkgs --nodeps "$PKG" >"$OUT/rpm-upgrade.log" 2>&1
{ echo "== upgraded"; state; grep '^EXECGUARD_OPTS=' "$R/etc/default/execguard"; } \
    >"$OUT/rpm-life"
rpm --root "$R" -e execguard >"$OUT/rpm-erase.log" 2>&1
{ echo "== erased"; state; } >>"$OUT/rpm-life"
"""


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    done = subprocess.run(["./scripts/build-deb.sh"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OUT": str(out)})
    assert done.returncode == 0, done.stderr[-3000:]
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.parent == out and path.name.startswith("execguard_"), path
    return path


def dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], check=True, capture_output=True, text=True,
                          timeout=120).stdout


def test_the_package_holds_the_agent_its_programs_the_unit_and_a_conffile(deb: Path) -> None:
    fields = {name: dpkg_deb("-f", str(deb), name).strip()
              for name in ("Package", "Architecture", "Depends", "Recommends")}
    assert fields["Package"] == "execguard"
    depends = fields["Depends"]
    for need in ("python3 (>= 3.", "python3 (<< 3.", "python3-bpfcc", "python3-audit"):
        assert need in depends, depends
    assert "auditd" in fields["Recommends"]
    files = {line.split()[-1].lstrip(".") for line in dpkg_deb("-c", str(deb)).splitlines()}
    site = next(f for f in files if f.endswith("/site-packages/agent/")).rstrip("/")
    for path in ("/opt/execguard/bin/execguard", "/lib/systemd/system/execguard.service",
                 "/etc/default/execguard", "/etc/execguard/keys/",
                 "/usr/share/man/man1/execguard.1",
                 "/usr/share/bash-completion/completions/execguard",
                 "/opt/execguard/share/doc/execguard/policy-enforce.toml",
                 f"{site}/sensors/bpf/programs/exec_lsm.c",
                 f"{site}/sensors/bpf/programs/exec_verdict.h"):
        assert path in files, path
    # nothing of the build machine: no staging path, no byte code, no state or logs
    assert not [f for f in files if f.startswith(("/var/", "/run/", "/tmp/"))]
    assert not [f for f in files if f.endswith(".pyc")]
    control = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], check=True,
                             capture_output=True, timeout=60).stdout
    listing = subprocess.run(["tar", "-t"], input=control, capture_output=True,
                             check=True).stdout.decode()
    assert {"./conffiles", "./postinst", "./prerm", "./postrm"} <= set(listing.split())
    conffiles = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True,
                               text=True, check=True).stdout.split()
    assert conffiles == ["/etc/default/execguard"]


@pytest.fixture(scope="module")
def debian_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("debian-root") / "root"
    boot = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root)],
                          capture_output=True, text=True, timeout=600)
    assert boot.returncode == 0, boot.stdout[-3000:] + boot.stderr[-3000:]
    return root


def in_root(script: str, root: Path, package: Path, work: Path) -> Dict[str, str]:
    """``script`` in a private mount namespace; returns the files it wrote to ``work``."""
    out = work / "out"
    out.mkdir()
    (work / "script.sh").write_text(script)
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash",
                           str(work / "script.sh"), str(root), str(package), str(out)],
                          capture_output=True, text=True, timeout=600)
    logs = {p.name: p.read_text(errors="replace") for p in out.iterdir()}
    assert done.returncode == 0, (done.stderr[-3000:], {k: v[-1500:] for k, v in logs.items()})
    return logs


@pytest.fixture(scope="module")
def lived(deb: Path, debian_root: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Dict[str, str]:
    """The .deb's life in a fresh Debian root: install, doctor, upgrade, remove, purge."""
    return in_root(IN_ROOT, debian_root, deb, tmp_path_factory.mktemp("deb-life"))


@pytest.fixture(scope="module")
def rpm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rpm")
    done = subprocess.run(["./scripts/build-rpm.sh"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OUT": str(out)})
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def rpm_lived(rpm: Path, debian_root: Path, lived: Dict[str, str],
              tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    """The .rpm's life in the same root once the .deb is purged: install, doctor,
    upgrade, erase."""
    return in_root(RPM_IN_ROOT, debian_root, rpm, tmp_path_factory.mktemp("rpm-life"))


def test_apt_installs_it_into_a_fresh_debian_root_and_its_doctor_runs(
        lived: Dict[str, str]) -> None:
    assert "Setting up execguard" in lived["install.log"], lived["install.log"][-2000:]
    # the venv names its own place, never the staging directory it was built in
    assert "/opt/execguard" in lived["pyvenv.cfg"] and "/tmp" not in lived["pyvenv.cfg"], \
        lived["pyvenv.cfg"]
    assert lived["doctor.rc"].strip() in ("0", "1"), lived["doctor.err"]
    rep = json.loads(lived["doctor.json"])
    programs = rep["probes"]["bpf-programs"]
    assert programs["ok"] and " in /opt/execguard/lib/python3" in programs["detail"], programs
    # the root has no kernel headers: doctor says so instead of offering a BCC backend
    assert rep["backend"]["chosen"] in ("fanotify-exec", "bpf-lsm"), rep["backend"]


def test_an_upgrade_keeps_state_and_conffile_a_removal_keeps_them_a_purge_does_not(
        lived: Dict[str, str]) -> None:
    life = lived["life"].split("== ")
    upgraded, removed, purged = (part.split("\n", 1)[1] for part in life[1:])
    assert "/opt/execguard/bin/execguard" in upgraded
    assert "policy-version.json" in upgraded
    assert 'EXECGUARD_OPTS="--quiet --mine"' in upgraded  # the admin's edit, not the shipped
    assert "/opt/execguard/bin/execguard" not in removed
    assert "/etc/default/execguard" in removed and "policy-version.json" in removed
    # the purge took the cache and logs, not the anti-rollback version and the spent tokens
    assert purged.split() == ["applied.json", "breakglass.jsonl"], purged


def rpm_query(package: Path, *what: str) -> str:
    return subprocess.run(["rpm", "-qp", *what, str(package)], check=True, capture_output=True,
                          text=True, timeout=60).stdout


def test_the_rpm_holds_the_same_install_and_its_scriptlets_use_service_ctl(rpm: Path) -> None:
    files = set(rpm_query(rpm, "-l").split())
    for path in ("/opt/execguard/bin/execguard", "/usr/lib/systemd/system/execguard.service",
                 "/etc/default/execguard", "/opt/execguard/share/execguard/service-ctl",
                 "/usr/share/man/man1/execguard.1",
                 "/usr/share/bash-completion/completions/execguard"):
        assert path in files, path
    assert any(f.endswith("/sensors/bpf/programs/exec_lsm.c") for f in files)
    assert not [f for f in files if f.endswith(".pyc") or f.startswith(("/var/", "/run/"))]
    assert rpm_query(rpm, "--configfiles").split() == ["/etc/default/execguard"]
    requires = rpm_query(rpm, "--requires")
    for need in ("python(abi) = 3.", "python3-bcc", "python3-audit"):
        assert need in requires, requires
    scripts = {block.split(" scriptlet")[0]: block for block in
               rpm_query(rpm, "--scripts").split("\n") if " scriptlet" in block}
    text = rpm_query(rpm, "--scripts")
    # RPM runs the new %pre, unpacks, then the old %preun: the old agent must be stopped in
    # %pre (with its token where it keeps enforcing, or the upgrade fails there), started
    # again in %posttrans; an erase stops it in %preun
    assert {"preinstall", "postinstall", "preuninstall", "postuninstall",
            "posttrans"} <= set(scripts), scripts
    ctl = "/opt/execguard/share/execguard/service-ctl"
    assert f'if [ "$1" -ge 2 ] && [ -x {ctl} ]; then {ctl} stopping upgrade || exit 1; fi' \
        in text
    assert f'if [ "$1" -eq 1 ]; then {ctl} installed first; fi' in text
    assert f'if [ "$1" -eq 0 ]; then {ctl} stopping remove; fi' in text
    assert f"{ctl} installed upgrade" in text


def test_rpm_installs_upgrades_and_erases_it_keeping_state_and_conffile(
        rpm_lived: Dict[str, str]) -> None:
    assert rpm_lived["rpm-doctor.rc"].strip() in ("0", "1"), rpm_lived["rpm-doctor.err"]
    rep = json.loads(rpm_lived["rpm-doctor.json"])
    assert rep["probes"]["bpf-programs"]["ok"], rep["probes"]["bpf-programs"]
    upgraded, erased = (part.split("\n", 1)[1] for part in rpm_lived["rpm-life"].split("== ")[1:])
    assert "/opt/execguard/bin/execguard" in upgraded and "policy-version.json" in upgraded
    assert 'EXECGUARD_OPTS="--quiet --mine"' in upgraded  # %config(noreplace)
    assert "/opt/execguard/bin/execguard" not in erased
    assert "policy-version.json" in erased  # the agent's state outlives the package
