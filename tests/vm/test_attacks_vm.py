"""The attack suite (tests/attacks/ways.py) against bpf-lsm and fmod-ret in the test VM, under
the lockdown mode guest.sh set: one enforcing agent per backend and run, scoped to a tmpfs the
test owns, every way and user asserting the outcome ``ways.EXPECTED`` promises.

The attack programs and the signed Go material are built on the host before boot
(guest_env.prebuild); under qemu TCG a verification takes seconds, so deadlines are long and
the ways get time to let the agent judge a file again (``judge_pause``).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from tests.agent_fixtures import scoped_tmpfs
from tests.attacks.arena import Arena, arena
from tests.attacks.harness import User, tools_from_manifest
from tests.attacks.ways import WAYS, Way, expected
from tests.policy_fixtures import Material
from tests.vm.guest_env import load_manifest

pytestmark = pytest.mark.timeout(400)
BACKENDS = ("bpf-lsm", "fmod-ret")
DEADLINE_MS = 15000  # one verification of a Go binary takes 1.5-2.2 s under TCG



def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every way as root in every lockdown mode; the unprivileged variants too under
    confidentiality (runtime-raised and at boot), the mode the BPF programs are written for:
    a full pass per mode would cost more VM time than make test may spend."""
    if "way" not in metafunc.fixturenames:
        return
    every_user = metafunc.config.getoption("--lockdown-mode") == "confidentiality"
    cases = [pytest.param(way, user, id=f"{way.name}-{user.value}")
             for way in WAYS for user in way.users if every_user or user is User.ROOT]
    metafunc.parametrize(("way", "user"), cases)


@pytest.fixture(scope="session")
def tools(vm_results: Path) -> Dict[str, Path]:
    return tools_from_manifest(load_manifest(vm_results / "fixtures"))


@contextlib.contextmanager
def temp_on_tmpfs() -> Iterator[None]:
    """The guest's /tmp is virtme's overlay, which an overlay cannot use as its upper layer:
    the ways' work directories go on a tmpfs of the module's own (what a host's /tmp is).
    Only while the arena is built and used: pytest's own temporary directories stay put."""
    with scoped_tmpfs("256m") as where:
        saved, tempfile.tempdir = tempfile.tempdir, str(where)
        try:
            yield
        finally:
            tempfile.tempdir = saved


@pytest.fixture(scope="module", params=BACKENDS)
def ready(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          vm_material: Material, tools: Dict[str, Path]) -> Iterator[Arena]:
    backend = str(request.param)
    tmp = tmp_path_factory.mktemp(f"attacks-{backend}")  # before tempdir moves
    with temp_on_tmpfs(), arena(backend, tmp, tools, vm_material.private["a"],
                                vm_material.keys["a"], deadline_ms=DEADLINE_MS,
                                ready_timeout=300, prewarm_timeout=240,
                                judge_pause=6.0) as place:
        yield place


def evidence(place: Arena, before: int) -> str:
    place.settle(quiet=1.0, timeout=15)
    logged: List[str] = [json.dumps({
        "path": d["event"]["path"], "uid": d["event"].get("uid"),
        **{k: d.get(k) for k in ("decision", "reason", "enforcement", "rule_id", "extra",
                                 "detail")}})
        for d in place.decisions_since(before)]
    status = place.agent.status()
    return ("logged:\n  " + ("\n  ".join(logged) or "nothing")
            + f"\nsensor: {status.get('sensor')}\nagent output:\n"
            + place.agent.output.read_text()[-1500:])


def test_attack(ready: Arena, way: Way, user: User) -> None:
    ready.use_policy(way.policy)
    before = ready.decision_count()
    outcome = way.attempt(ready.stage, user)
    want = expected(way.name, ready.backend, user)
    assert want.matches(outcome), (
        f"{way.name} as {user.value} on {ready.backend}: expected {want.outcome} "
        f"({want.reason or 'no reason'}), got {outcome}\n{evidence(ready, before)}")
