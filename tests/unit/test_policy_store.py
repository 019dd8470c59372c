"""Subjects read from real files, and policy reload under concurrent decisions.

Test strategy summary: ``subject_of`` on a real Go binary, a shell script and a truncated
Go binary (the policy's reading of "malformed build info" is "Go, nothing provable").
The store is reloaded (good and bad policies) while threads decide; every decision must be
consistent with exactly the one snapshot it took, generations only grow, and a bad reload
leaves the previous policy in place.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import List

from agent.digest import Artifact
from agent.errors import MalformedInput, Reason
from agent.policy import Action, PolicySnapshot, Subject, apply_overrides, decide, default_policy
from agent.policy.store import PolicyStore
from agent.policy.subject import subject_of
from agent.verify.model import TrustConfig, Verdict
from tests.policy_fixtures import Material, material_fixture  # noqa: F401


def test_subject_of_real_files(material: Material, tmp_path: Path) -> None:
    with Artifact.open(str(material.bins["app"].path)) as art:
        go = subject_of(art, 1000)
    assert go.go and go.buildinfo == material.bins["app"].info and go.uid == 1000
    with Artifact.open(str(material.script)) as art:
        script = subject_of(art, 0, path="/opt/app/run")
    assert (script.go, script.buildinfo, script.path) == (False, None, "/opt/app/run")
    cut = tmp_path / "cut"
    cut.write_bytes(material.bins["app"].path.read_bytes()[:8192])
    with Artifact.open(str(cut)) as art:
        truncated = subject_of(art, 0)
    assert (truncated.go, truncated.buildinfo) == (True, None)
    # In enforce mode the default rules then demand a signature: the truncated file is blocked.
    snap = apply_overrides(default_policy(), mode="enforce", keys=[str(material.keys["a"])])
    with Artifact.open(str(cut)) as art:
        outcome = decide(snap, truncated, lambda t: _verify_cut(art, t))
    assert outcome.blocks and outcome.reason is Reason.NO_SIGNATURE


def _verify_cut(art: Artifact, trust: TrustConfig) -> Verdict:
    from agent.verify import verify_artifact

    return verify_artifact(art, trust)


def _fail(trust: TrustConfig) -> Verdict:
    return Verdict.fail(Reason.NO_SIGNATURE, "none")


def test_reload_under_concurrent_decisions(material: Material) -> None:
    monitor = default_policy()
    enforce = apply_overrides(monitor, mode="enforce")
    store = PolicyStore(monitor)
    go_subject = Subject("/opt/x", 0, True, material.bins["app"].info)
    problems: List[str] = []
    done = threading.Event()

    def decider() -> None:
        last = 0
        for _ in range(3000):
            gen = store.current
            outcome = decide(gen.snapshot, go_subject, _fail)
            if gen.number < last:
                problems.append(f"generation went back: {gen.number} < {last}")
            last = gen.number
            if outcome.mode is not gen.snapshot.mode or outcome.blocks != (
                    gen.snapshot is enforce):
                problems.append(f"decision mixed two policies: {outcome}")

    def bad() -> PolicySnapshot:
        raise MalformedInput("policy.toml", "rules[0].action: broken on purpose")

    def reloader() -> None:
        i = 0
        while not done.is_set():
            nxt = enforce if i % 2 else monitor
            store.reload(lambda snap=nxt: snap)  # type: ignore[misc]
            err = store.try_reload(bad)
            if err is None:
                problems.append("a bad policy was accepted")
            i += 1

    threads = [threading.Thread(target=decider) for _ in range(4)]
    swapper = threading.Thread(target=reloader)
    swapper.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    done.set()
    swapper.join(timeout=60)
    assert not any(t.is_alive() for t in [*threads, swapper])
    assert problems == []
    assert store.current.number > 2
    assert store.current.snapshot in (monitor, enforce)
    assert monitor.effective_on_timeout is Action.ALLOW
