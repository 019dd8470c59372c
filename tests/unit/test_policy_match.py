"""Rule matching on the exec's gid and on the file's owner, and a rule's own ``mode``.

Subjects for ``evaluate`` are plain values; ``subject_of`` reads a real file's owner with
fstat (files chowned here: the suite runs as root); the ``Decider`` tests run the real
decider (cache, verifier, policy) on real files, so the per-rule mode is checked where the
enforcement is chosen.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from agent.cache import TrustedCache, identity_from_stat
from agent.decide import Decider
from agent.decision import Decision, Enforcement, ExecEvent
from agent.digest import Artifact
from agent.errors import MalformedInput, Reason
from agent.policy import Action, Mode, PolicyStore, Subject, decide, evaluate, parse_policy
from agent.policy.model import PolicySnapshot
from agent.policy.subject import subject_of
from agent.verify.model import Verdict


def policy(rules: List[Dict[str, Any]], **top: Any) -> PolicySnapshot:
    document = {"version": 1, "trust": {"keys": []}, **top, "rules": rules}
    return parse_policy(json.dumps(document).encode(), "test.json")


def who(uid: int = 1000, gid: Optional[int] = 1000, owner_uid: Optional[int] = 0,
        owner_gid: Optional[int] = 0) -> Subject:
    return Subject("/opt/app/tool", uid, gid=gid, owner_uid=owner_uid, owner_gid=owner_gid)


def deny_unless(match: Dict[str, Any]) -> PolicySnapshot:
    return policy([{"id": "ok", "action": "allow", "match": match}])  # fallthrough deny


def test_gid_matches_the_exec_gid_only() -> None:
    snap = deny_unless({"gids": [27, 100]})
    assert evaluate(snap, who(gid=100)).rule_id == "ok"
    assert evaluate(snap, who(gid=1000)).reason is Reason.NO_RULE


def test_unknown_gid_never_matches_even_an_allow_list_with_everything() -> None:
    snap = deny_unless({"gids": [0, 1, 2, 3, 4, 1000]})
    assert evaluate(snap, who(gid=None)).reason is Reason.NO_RULE
    # and a deny rule on gids does not catch an unknown gid either: it is not evidence
    denying = policy([{"id": "no-staff", "action": "deny", "match": {"gids": [50]}},
                      {"id": "rest", "action": "allow"}])
    assert evaluate(denying, who(gid=None)).rule_id == "rest"


def test_owner_uid_and_owner_gid() -> None:
    snap = deny_unless({"owner_uids": [0], "owner_gids": [0, 4]})
    assert evaluate(snap, who(owner_uid=0, owner_gid=4)).rule_id == "ok"
    assert evaluate(snap, who(owner_uid=1000, owner_gid=4)).reason is Reason.NO_RULE
    assert evaluate(snap, who(owner_uid=0, owner_gid=1000)).reason is Reason.NO_RULE
    assert evaluate(snap, who(owner_uid=None)).reason is Reason.NO_RULE


def test_all_conditions_must_hold() -> None:
    snap = deny_unless({"uids": [1000], "gids": [1000], "owner_uids": [0],
                        "paths": ["/opt/app"]})
    assert evaluate(snap, who()).rule_id == "ok"
    assert evaluate(snap, who(uid=1001)).reason is Reason.NO_RULE
    assert evaluate(snap, Subject("/srv/tool", 1000, gid=1000, owner_uid=0)).reason \
        is Reason.NO_RULE


def test_subject_of_reads_the_owner_from_the_open_file(tmp_path: Path) -> None:
    path = tmp_path / "tool"
    path.write_bytes(b"#!/bin/sh\n")
    os.chown(path, 4321, 8765)
    with Artifact.open(str(path)) as art:
        os.chown(path, 1, 1)  # same inode: fstat sees the change (the open fd's file)
        subject = subject_of(art, 1000, gid=55)
    assert (subject.uid, subject.gid, subject.owner_uid, subject.owner_gid) == (1000, 55, 1, 1)
    replaced = tmp_path / "tool2"
    replaced.write_bytes(b"#!/bin/sh\n")
    os.chown(replaced, 4321, 8765)
    with Artifact.open(str(replaced)) as art:
        other = tmp_path / "swap"
        other.write_bytes(b"x")
        os.chown(other, 0, 0)
        os.replace(other, replaced)  # the path names another file now; the fd does not
        assert subject_of(art, 0).owner_uid == 4321
        assert subject_of(art, 0).gid is None  # the sensor did not say


@pytest.mark.parametrize("match,problem", [
    ({"gids": []}, "must not be empty"),
    ({"gids": [-1]}, "out of range"),
    ({"owner_uids": ["root"]}, "expected an integer"),
    ({"owner_gids": [2**32]}, "out of range"),
    ({"gid": [1]}, "unknown key"),
])
def test_schema_errors_name_the_key(match: Dict[str, Any], problem: str) -> None:
    with pytest.raises(MalformedInput) as err:
        policy([{"id": "r", "action": "allow", "match": match}])
    assert problem in str(err.value) and "rules[0] (id r).match." in str(err.value)


def test_new_keys_at_their_defaults_leave_the_digest_alone() -> None:
    plain = policy([{"id": "r", "action": "deny"}])
    spelled = policy([{"id": "r", "action": "deny", "match": {}}])
    assert plain.digest == spelled.digest
    assert "gids" not in plain.canonical and '"mode":"monitor"' in plain.canonical
    with_gids = policy([{"id": "r", "action": "deny", "match": {"gids": [1]}}])
    assert with_gids.digest != plain.digest


# -- a rule's own mode --------------------------------------------------------------------

def test_rule_mode_schema_and_warning() -> None:
    with pytest.raises(MalformedInput, match=r"rules\[0\] \(id r\)\.mode: expected"):
        policy([{"id": "r", "action": "deny", "mode": "audit"}])
    snap = policy([{"id": "r", "action": "deny", "mode": "enforce"}], mode="monitor")
    assert any("enforce has no effect" in w for w in snap.warnings)


def test_monitor_rule_in_enforce_policy_decides_deny_but_does_not_block() -> None:
    snap = policy([{"id": "watch", "action": "deny", "mode": "monitor",
                    "match": {"paths": ["/opt/new"]}},
                   {"id": "hard", "action": "deny", "match": {"paths": ["/opt/old"]}},
                   {"id": "ok", "action": "allow"}], mode="enforce")
    never = lambda trust: Verdict.fail(Reason.NO_SIGNATURE, "")  # noqa: E731
    soft = decide(snap, Subject("/opt/new/x", 0), never)
    assert (soft.allow, soft.mode, soft.blocks, soft.rule_id) == (False, Mode.MONITOR, False,
                                                                  "watch")
    hard = decide(snap, Subject("/opt/old/x", 0), never)
    assert (hard.allow, hard.mode, hard.blocks) == (False, Mode.ENFORCE, True)
    assert decide(snap, Subject("/opt/x", 0), never).mode is Mode.ENFORCE


def test_policy_monitor_is_a_ceiling_and_fallthrough_uses_the_policy_mode() -> None:
    rules = [{"id": "strict", "action": "deny", "mode": "enforce",
              "match": {"paths": ["/opt/a"]}}]
    never = lambda trust: Verdict.fail(Reason.NO_SIGNATURE, "")  # noqa: E731
    monitor = policy(rules, mode="monitor")
    assert not decide(monitor, Subject("/opt/a/x", 0), never).blocks
    enforce = policy(rules, mode="enforce")
    assert decide(enforce, Subject("/opt/a/x", 0), never).blocks
    fell = decide(enforce, Subject("/opt/b", 0), never)
    assert fell.rule_id is None and fell.mode is Mode.ENFORCE and fell.blocks
    assert evaluate(enforce, Subject("/opt/b", 0)).action is Action.DENY


# -- through the real Decider: the enforcement a backend acts on --------------------------

def _decide(decider: Decider, path: Path, gid: Optional[int]) -> Decision:
    fd = os.open(path, os.O_RDONLY)
    try:
        event = ExecEvent(os.getpid(), os.getppid(), 1000, 1000, "test", str(path),
                          identity_from_stat(os.fstat(fd)), time.time_ns(), "test", gid=gid)
        return decider.decide(event, fd, Enforcement.FANOTIFY_DENY)
    finally:
        os.close(fd)


def test_decider_applies_gid_owner_and_rule_mode(tmp_path: Path) -> None:
    scope = tmp_path / "scope"
    scope.mkdir()
    rules = [
        {"id": "ops-group", "action": "allow", "match": {"gids": [4242]}},
        {"id": "root-owned", "action": "allow", "match": {"owner_uids": [0]}},
        {"id": "trial", "action": "deny", "mode": "monitor",
         "match": {"paths": [str(scope / "trial")]}},
    ]
    snap = policy(rules, mode="enforce", scopes=[str(scope)],
                  state_dir=str(tmp_path / "s"), log_dir=str(tmp_path / "l"))
    decider = Decider(PolicyStore(snap), TrustedCache(str(tmp_path / "c.msgpack"), "x"))
    tool = scope / "tool"
    tool.write_bytes(b"#!/bin/sh\n")
    os.chown(tool, 1000, 1000)
    by_ops = _decide(decider, tool, 4242)
    assert by_ops.allow and by_ops.rule_id == "ops-group"
    unknown = _decide(decider, tool, None)  # gid unknown, not root-owned: fallthrough deny
    assert (unknown.allow, unknown.reason, unknown.enforcement) == (
        False, Reason.NO_RULE, Enforcement.FANOTIFY_DENY)
    os.chown(tool, 0, 0)
    assert _decide(decider, tool, None).rule_id == "root-owned"
    (scope / "trial").mkdir()
    trial = scope / "trial" / "new"
    trial.write_bytes(b"#!/bin/sh\n")
    os.chown(trial, 1000, 1000)
    soft = _decide(decider, trial, 1000)
    assert (soft.allow, soft.rule_id, soft.reason, soft.enforcement) == (
        False, "trial", Reason.POLICY_DENY, Enforcement.MONITOR)
    assert decider.stats.by_outcome["would-deny"] == 1


def test_caller_dependent_policies_are_flagged() -> None:
    """Backends must not cache an allow per file when more than the bytes decide (fanotify
    ignore marks): the caller's ids, or the file's owner, which chown changes without
    clearing an ignore mark. The integration test shows a second caller still being asked."""
    assert not policy([{"id": "r", "action": "allow", "match": {"paths": ["/opt"]}}]
                      ).caller_dependent
    for match in ({"uids": [0]}, {"gids": [10]}, {"owner_uids": [0]}, {"owner_gids": [0]}):
        assert policy([{"id": "r", "action": "allow", "match": match}]).caller_dependent


def test_path_dependent_policies_keep_no_per_inode_allow() -> None:
    """An ignore mark stays on the inode through a rename: only policies whose verdict does
    not depend on the path (below whole-directory scopes) may use it."""
    assert policy([{"id": "r", "action": "allow", "match": {"paths": ["/**"]}}]).file_decides
    assert not policy([{"id": "r", "action": "allow", "match": {"paths": ["/opt/tools"]}}]
                      ).file_decides
    assert not policy([{"id": "r", "action": "allow", "match": {"uids": [0]}}]).file_decides
    for scopes, whole in ((["/opt/app"], True), (["/opt/app/**"], True), (["/"], True),
                          (["/srv/**/bin"], False), (["/opt/*.bin"], False)):
        assert policy([], scopes=scopes).file_decides is whole, scopes
