"""The agent as `make install` puts it (built on the host by scripts/vm-run.sh's prebuild, run
here from its own venv with nothing of the checkout importable) chooses bpf-lsm on its own
and enforces with it: the BPF programs it compiles are the ones its package ships. (Doctor
runs the same probes; on the host, tests/integration/test_installed_agent.py runs the
installed doctor. One BCC probe round under TCG is about a minute, so it is not repeated
here.)

One run is enough to show the installed artifact is the tested one: confidentiality set at
boot, the strictest mode, where a backend that needed anything outside the package (or a
bpf_probe_read) would not load.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.agent_fixtures import exec_file, running_agent, scoped_tmpfs, wait_for
from tests.install_fixtures import Installed
from tests.policy_fixtures import Material, copy_signed
from tests.rearm_fixtures import write_policy
from tests.vm.guest_env import load_manifest

pytestmark = [pytest.mark.timeout(420), pytest.mark.lockdown_runs("confidentiality-boot")]
EPERM_RC = 126  # exec_file: PermissionError from the exec
DEADLINE_MS = 15000  # one Go verification takes up to ~2 s under TCG (test_lsm_enforce.py)


@pytest.fixture(scope="module")
def installed(vm_results: Path) -> Installed:
    root = Path(load_manifest(vm_results / "fixtures")["installed:root"])
    return Installed(root, root / "opt" / "execguard")


def test_the_installed_agent_enforces_with_bpf_lsm_by_its_own_choice(
        installed: Installed, tmp_path: Path, vm_material: Material) -> None:
    with scoped_tmpfs() as scope:
        signed = copy_signed(vm_material.bins["app"], scope / "ok", vm_material.private["a"])
        unsigned = copy_signed(vm_material.bins["app"], scope / "bad", None)
        policy = write_policy(tmp_path / "policy.toml", mode="enforce", scopes=[scope],
                              keys=[vm_material.keys["a"]], deadline_ms=DEADLINE_MS)
        with running_agent(tmp_path, "--policy", str(policy), "--audit", "off",
                           ready_timeout=300, execguard=(str(installed.execguard),),
                           env=installed.env()) as agent:
            # the same probes as doctor's (BCC loads each backend's test program): bpf-lsm,
            # the first, passed them and its self-test, so nothing was skipped
            status = agent.status()
            assert status["backend"] == "bpf-lsm" and status["enforcement"] == "lsm-deny", \
                status
            assert status["skipped_backends"] == [], status["skipped_backends"]
            wait_for(lambda: bool(agent.status()["prewarm"]["scan_done"]), timeout=120)
            ran = exec_file(signed)
            assert ran.returncode == 0 and ran.stdout == "app\n", ran
            refused = exec_file(unsigned)
            assert refused.returncode == EPERM_RC, refused
            rec = agent.wait_decision(str(unsigned))[-1]
            assert rec["decision"] == "deny" and rec["enforcement"] == "lsm-deny"
