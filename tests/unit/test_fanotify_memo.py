"""The fanotify runner's allow memo (agent/backends/fanotify_memo.py): which allows the loop
may answer from memory, on real signed Go binaries through the real decider. No fanotify
group here: the runner's hooks are called as the backend calls them."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import List, Tuple

from agent.backends.fanotify import FanotifyRunner
from agent.backends.fanotify_memo import MAX_ENTRIES, AllowMemo
from agent.cache import TrustedCache, identity_from_stat
from agent.decide import SETTLE_NS, Decider
from agent.decision import Decision, Enforcement, ExecEvent, FileIdentity, Source
from agent.errors import Reason
from agent.policy import PolicyStore, apply_overrides, default_policy
from agent.sensors.fanotify_model import Cause, Outcome
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401


def rig(tmp_path: Path, material: Material, scope_glob: str = ""
        ) -> Tuple[FanotifyRunner, List[Decision], Path]:
    scope = tmp_path / "scope"
    scope.mkdir()
    snap = apply_overrides(default_policy(), mode="enforce",
                           scopes=(scope_glob or str(scope),),
                           keys=(str(material.keys["a"]),), state_dir=str(tmp_path / "s"),
                           log_dir=str(tmp_path / "l"))
    decider = Decider(PolicyStore(snap), TrustedCache(str(tmp_path / "cache"), "x"))
    records: List[Decision] = []
    runner = FanotifyRunner("fanotify-exec", decider, records.append)
    runner._memo = AllowMemo(snap)  # what start() makes for the policy in force
    return runner, records, scope


def exec_event(path: Path) -> ExecEvent:
    ident = identity_from_stat(os.stat(path))
    return ExecEvent(4242, 1, 1000, 1000, "sh", str(path), ident, time.time_ns(),
                     "fanotify-exec")


def snapshot_of(runner: FanotifyRunner):  # type: ignore[no-untyped-def]
    return runner.decider.store.current.snapshot


def settle() -> None:
    """Let the files just written age past SETTLE_NS: a file changed within the last clock
    tick or so is never remembered (a second write in that tick keeps its identity)."""
    time.sleep(SETTLE_NS / 1e9 * 3)


def test_a_pre_verified_allow_is_answered_from_memory_with_a_full_record(
        tmp_path: Path, material: Material) -> None:
    runner, records, scope = rig(tmp_path, material)
    signed = copy_signed(material.bins["app"], scope / "ok", material.private["a"])
    os.chmod(signed, 0o755)  # a change just now: too fresh to remember
    ident = identity_from_stat(os.stat(signed))
    runner.remember(str(signed), ident, True, snapshot_of(runner))
    assert runner._lookup(exec_event(signed)) is None
    settle()
    runner.remember(str(signed), ident, True, snapshot_of(runner))
    event = exec_event(signed)
    assert runner._lookup(event) is True
    runner._observe(Outcome(Cause.CACHED, True, event.pid, event.path, event, 80))
    (record,) = records
    assert record.allow and record.source is Source.CACHE and record.event is event
    assert record.sha256 and record.evidence is not None and record.go is not None
    assert record.go["module"] == "example.com/app" and record.latency_us == 80
    assert runner.decider.stats.to_json()["decisions"] == {}  # not an exec decision


def test_what_is_never_remembered(tmp_path: Path, material: Material) -> None:
    runner, _, scope = rig(tmp_path, material)
    snap = snapshot_of(runner)
    unsigned = copy_signed(material.bins["app"], scope / "bad", None)
    runner.remember(str(unsigned), identity_from_stat(os.stat(unsigned)), True, snap)
    assert runner._lookup(exec_event(unsigned)) is None  # decided again: a denial

    signed = copy_signed(material.bins["app"], scope / "ok", material.private["a"])
    stale = identity_from_stat(os.stat(signed))
    with open(signed, "ab") as fh:  # changed after it was pre-verified
        fh.write(b"\0")
    runner.remember(str(signed), stale, True, snap)
    assert runner._lookup(exec_event(signed)) is None

    other = copy_signed(material.bins["app"], scope / "other", material.private["a"])
    ident = identity_from_stat(os.stat(other))
    settle()
    runner.remember(str(other), ident, True, apply_overrides(snap, mode="monitor"))
    assert runner._lookup(exec_event(other)) is None  # another policy's verdict

    writer = open(other, "ab")  # noqa: SIM115 (held open on purpose)
    try:
        runner.remember(str(other), ident, True, snap)
        assert runner._lookup(exec_event(other)) is None  # has writers: never published
    finally:
        writer.close()
    runner.remember(str(other), ident, True, snap)
    assert runner._lookup(exec_event(other)) is True
    runner._memo = AllowMemo(apply_overrides(snap, mode="monitor"))  # a policy swap
    assert runner._lookup(exec_event(other)) is None


def test_a_path_dependent_policy_remembers_nothing(tmp_path: Path, material: Material) -> None:
    runner, _, scope = rig(tmp_path, material, scope_glob=f"{tmp_path}/scope/*/app")
    assert not snapshot_of(runner).file_decides
    signed = copy_signed(material.bins["app"], scope / "ok", material.private["a"])
    ident = identity_from_stat(os.stat(signed))
    runner.remember(str(signed), ident, True, snapshot_of(runner))
    fd = os.open(signed, os.O_RDONLY)
    try:
        event = exec_event(signed)
        assert runner._decide(event, fd) is True  # allowed, but only for this exec
    finally:
        os.close(fd)
    assert runner._lookup(exec_event(signed)) is None


def test_a_decided_allow_is_remembered_and_a_shared_answer_recorded(
        tmp_path: Path, material: Material) -> None:
    runner, records, scope = rig(tmp_path, material)
    signed = copy_signed(material.bins["app"], scope / "ok", material.private["a"])
    settle()
    leader, joiner = exec_event(signed), exec_event(signed)
    fd = os.open(signed, os.O_RDONLY)
    try:
        assert runner._decide(leader, fd) is True
    finally:
        os.close(fd)
    assert runner._lookup(exec_event(signed)) is True
    runner._observe(Outcome(Cause.SHARED, True, joiner.pid, joiner.path, joiner, 5, "",
                            leader))
    runner._observe(Outcome(Cause.DECIDED, True, leader.pid, leader.path, leader, 9))
    assert [r.event for r in records] == [joiner, leader]
    assert records[0].extra["shared_with"] == leader.pid and records[0].latency_us == 5


def test_the_memo_is_bounded(tmp_path: Path, material: Material) -> None:
    runner, _, _ = rig(tmp_path, material)
    memo = AllowMemo(snapshot_of(runner))
    decision = Decision(exec_event(Path("/bin/true")), True, Reason.OK, "", Enforcement.NONE,
                        Source.CACHE)
    for ino in range(MAX_ENTRIES + 10):
        memo.put(FileIdentity(1, ino, 1, 1), decision)
    assert len(memo) <= MAX_ENTRIES
