"""Containers under bpf-lsm in enforce mode, in the test VM (issue 9, point 8): a real runc
starts a real overlay rootfs while the real BPF LSM program judges every exec. The host runs
the same three cases against fanotify-exec and kill (tests/attacks/test_containers_host.py).

- an image whose layers are outside every scope: its container runs;
- an image layer inside the scope with an unsigned busybox: the overlay is in scope (a layer
  is), so the container's first exec is refused with EPERM and recorded;
- the same with a signed busybox: it runs at the first start of a new overlay. The
  overlay's own inode has no verdict yet; the kernel judges it by its layer's file (the
  real file underneath, which the pre-scan verified), paired when the overlay opened it
  (exec_verdict.h eg_note_layer: 5.x to 6.5 kernels, this VM's 6.1 among them).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple

import pytest

from agent.backends.lsm import LAYER_HIT
from tests.agent_fixtures import RunningAgent, running_agent, scoped_tmpfs, wait_for
from tests.attacks.containers import bundle_of, make_image, run_container, runc_run
from tests.attacks.policies import ALL_SIGNED, write_policy
from tests.policy_fixtures import Material

# lockdown does not change what runc does: the strongest runtime mode carries it (CI budget)
pytestmark = [pytest.mark.timeout(600), pytest.mark.lockdown_runs("confidentiality")]

DEADLINE_MS = 15000  # a verification takes ~2 s under TCG


class Rig(NamedTuple):
    agent: RunningAgent
    scope: Path
    work: Path  # outside the scope: image layers and overlay work dirs


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, vm_material: Material) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("containers-bpf-lsm")
    with scoped_tmpfs("64m") as scope, scoped_tmpfs("64m") as work:
        make_image(scope / "unsigned")
        make_image(scope / "signed", vm_material.private["a"])
        make_image(work / "image")
        policy = write_policy(tmp / "policy.toml", ALL_SIGNED, scope, vm_material.keys["a"],
                              DEADLINE_MS)
        with running_agent(tmp, "--policy", str(policy), "--backend", "bpf-lsm",
                           ready_timeout=240) as agent:
            wait_for(lambda: bool(agent.status()["prewarm"]["scan_done"]), timeout=180)
            yield Rig(agent, scope, work)


def test_a_container_of_an_image_outside_every_scope_runs(rig: Rig) -> None:
    ran = run_container(rig.work / "image", rig.work, timeout=180)
    assert ran.said_hello, f"{ran}"


def test_a_container_whose_layer_is_in_scope_cannot_run_an_unsigned_program(rig: Rig) -> None:
    ran = run_container(rig.scope / "unsigned", rig.work, timeout=180)
    assert not ran.said_hello and "hello-from-container" not in ran.stdout, \
        f"the unsigned busybox ran in the container: {ran}"

    def denials() -> List[Dict[str, Any]]:
        return [d for d in rig.agent.decisions() if d["decision"] == "deny"
                and d["event"]["path"].endswith("/bin/busybox")]

    deadline = time.monotonic() + 30
    while not denials() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert denials(), f"no denial recorded: {rig.agent.decisions()[-5:]}"
    assert all(d["enforcement"] == "lsm-deny" for d in denials()), denials()


def test_a_signed_program_runs_at_the_first_start_of_a_new_container_overlay(
        rig: Rig) -> None:
    before = len(rig.agent.decisions())  # the module's other containers were denied
    with bundle_of(rig.scope / "signed", rig.work) as bundle:
        ran = runc_run(bundle, timeout=180)
    assert ran.said_hello, f"{ran}\n{rig.agent.decisions()[-5:]}"

    def by_layer() -> List[Dict[str, Any]]:
        return [d for d in rig.agent.decisions()[before:] if d["decision"] == "allow"
                and d["event"]["path"].endswith("/bin/busybox") and d["detail"] == LAYER_HIT]

    wait_for(lambda: bool(by_layer()), timeout=30)
    denied = [d for d in rig.agent.decisions()[before:] if d["decision"] == "deny"]
    assert not denied, f"refused on its overlay: {denied}"
