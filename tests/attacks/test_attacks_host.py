"""The attack suite against real agents on this host: fanotify-exec and kill in enforce mode
(the BPF LSM backends run it in the VM), one agent per backend for the whole module, scoped
to a tmpfs the test owns and trusting a test key only. One test per way and user asserts the
outcome ``ways.EXPECTED`` promises for the backend.

A third pass runs every way with no agent at all: each must run its attacker code there, so a
denial under an agent is the agent's doing and never a broken attack.

Safety: every exec has a deadline (harness), mounts go below the test's own scope and work
directory only and are undone in ``finally`` (arena), ptrace targets are the test's own
children, and the agent marks only the test's tmpfs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional

import pytest

from tests.agent_fixtures import scoped_tmpfs, wait_for
from tests.attacks.arena import Arena, arena, work_dir
from tests.attacks.harness import Result, User, build_all
from tests.attacks.ways import (
    HOST_BACKENDS,
    WAYS,
    Stage,
    Way,
    expected,
    make_stage,
    prepare_stage,
)
from tests.policy_fixtures import Material, material_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(180)
NO_AGENT = "no-agent"

CASES = [pytest.param(way, user, id=f"{way.name}-{user.value}")
         for way in WAYS for user in way.users]


@pytest.fixture(scope="module")
def tools() -> Dict[str, Path]:
    return build_all()


class Place(NamedTuple):
    backend: str
    stage: Stage
    arena: Optional[Arena]  # None: no agent runs


@pytest.fixture(scope="module", params=[NO_AGENT, *HOST_BACKENDS])
def place(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          material: Material, tools: Dict[str, Path]
          ) -> Iterator[Place]:
    backend = str(request.param)
    private, public = material.private["a"], material.keys["a"]
    if backend == NO_AGENT:
        with scoped_tmpfs("256m") as scope, work_dir() as work:
            stage = make_stage(scope, work, tools, private)
            prepare_stage(stage, WAYS)
            yield Place(backend, stage, None)
        return
    tmp = tmp_path_factory.mktemp(f"attacks-{backend}")
    with arena(backend, tmp, tools, private, public) as ready:
        yield Place(backend, ready.stage, ready)


def evidence(ready: Arena, before: int) -> str:
    """What the agent logged during the attack, and the tail of its output."""
    ready.settle()
    logged: List[str] = [json.dumps({
        "path": d["event"]["path"], "uid": d["event"].get("uid"),
        **{k: d.get(k) for k in ("decision", "reason", "enforcement", "rule_id", "extra")}})
        for d in ready.decisions_since(before)]
    tail = ready.agent.output.read_text()[-1500:]
    return "logged:\n  " + ("\n  ".join(logged) or "nothing") + f"\nagent output:\n{tail}"


@pytest.mark.parametrize(("way", "user"), CASES)
def test_attack(place: Place, way: Way, user: User) -> None:
    if place.arena is None:  # no agent: every attack must really run its code
        outcome = way.attempt(place.stage, user)
        assert outcome.result is Result.RAN, f"the attack itself is broken: {outcome}"
        return
    ready = place.arena
    ready.use_policy(way.policy)
    before = ready.decision_count()
    outcome = way.attempt(place.stage, user)
    want = expected(way.name, place.backend, user)
    if want.outcome == "LATE":  # detected only: the denial must be on record
        wait_for(lambda: any(d["decision"] == "deny" for d in ready.decisions_since(before)),
                 timeout=30)
    assert want.matches(outcome), (
        f"{way.name} as {user.value} on {place.backend}: expected {want.outcome} "
        f"({want.reason or 'no reason'}), got {outcome}\n{evidence(ready, before)}")
