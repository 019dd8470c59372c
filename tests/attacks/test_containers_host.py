"""Containers keep working in enforce mode, and a container does not carry an unsigned program
out of the scope (issue 9, point 8): a real runc starts a real overlay rootfs while a real
agent (fanotify-exec, kill) enforces a scope on a tmpfs the test owns.

- an image whose layers are outside every scope: its container runs;
- an image layer inside the scope with an unsigned busybox: the overlay is in scope (a layer
  is), so the container's first exec is refused (fanotify-exec) or killed (kill);
- the same with a signed busybox: it runs (the signature beside the layer file is found
  through the overlay).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple

import pytest

from tests.agent_fixtures import RunningAgent, running_agent, scoped_tmpfs, wait_for
from tests.attacks.containers import BUSYBOX, RUNC, bundle_of, make_image, run_container, runc_run
from tests.attacks.policies import ALL_SIGNED, write_policy
from tests.policy_fixtures import Material, material_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(240)


def test_the_runtime_is_installed() -> None:
    """runc and busybox-static come from scripts/setup.sh: missing is a failure, not a skip."""
    assert shutil.which(RUNC) is not None and BUSYBOX.exists()


class Rig(NamedTuple):
    agent: RunningAgent
    scope: Path
    work: Path  # outside the scope: image layers and overlay work dirs
    backend: str


@pytest.fixture(scope="module", params=["fanotify-exec", "kill"])
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        material: Material) -> Iterator[Rig]:
    backend = str(request.param)
    tmp = tmp_path_factory.mktemp(f"containers-{backend}")
    with scoped_tmpfs("64m") as scope, scoped_tmpfs("64m") as work:
        make_image(scope / "unsigned")
        make_image(scope / "signed", material.private["a"])
        make_image(work / "image")
        policy = write_policy(tmp / "policy.toml", ALL_SIGNED, scope, material.keys["a"], 5000)
        with running_agent(tmp, "--policy", str(policy), "--backend", backend, "--audit",
                           "off") as agent:
            wait_for(lambda: bool(agent.status()["prewarm"]["scan_done"]), timeout=60)
            yield Rig(agent, scope, work, backend)


@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture


def test_a_container_of_an_image_outside_every_scope_runs(rig: Rig) -> None:
    ran = run_container(rig.work / "image", rig.work)
    assert ran.said_hello, f"{rig.backend}: {ran}"


def test_a_container_whose_layer_is_in_scope_cannot_run_an_unsigned_program(rig: Rig) -> None:
    ran = run_container(rig.scope / "unsigned", rig.work)
    assert not ran.said_hello and "hello-from-container" not in ran.stdout, \
        f"{rig.backend}: the unsigned busybox ran in the container: {ran}"

    def denials() -> List[Dict[str, Any]]:
        return [d for d in rig.agent.decisions() if d["decision"] == "deny"
                and d["event"]["path"].endswith("/bin/busybox")]

    # kill decides after the kernel killed the exec, and the record is written after that:
    # wait for it rather than read the log at once
    deadline = time.monotonic() + 15
    while not denials() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert denials(), f"{rig.backend}: no denial recorded: {rig.agent.decisions()[-5:]}"


def test_a_container_whose_layer_is_in_scope_runs_a_signed_program(rig: Rig) -> None:
    """The kill backend has no fill: the first exec of a file the kernel has no verdict for
    (the overlay's own inode: the pre-scan verified the layer's) is killed, verified, and
    the next container runs. fanotify-exec decides it at its first exec."""
    with bundle_of(rig.scope / "signed", rig.work) as bundle:
        ran = runc_run(bundle)
        if rig.backend == "kill" and ran.returncode == 137:
            # the agent verifies the file after the kill: give it the time, then run again
            time.sleep(1.0)
            ran = runc_run(bundle)
        assert ran.said_hello, f"{rig.backend}: {ran}\n{rig.agent.decisions()[-5:]}"
