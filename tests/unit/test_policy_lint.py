"""Enforce-mode lint: every way an enforce policy lets an executable run without a signature
is a warning naming the rule (never an error), in the snapshot, in ``policy lint``, ``policy
build`` and ``policy verify``; monitor policies and complete enforce policies get none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from agent import signing
from agent.cli import main
from agent.policy import apply_overrides, default_policy, parse_policy
from agent.policy.model import PolicySnapshot

REPO = Path(__file__).resolve().parents[2]
HOLE = "without a signature"


def snap(rules: List[Dict[str, Any]], mode: str = "enforce", fallthrough: str = "deny"
         ) -> PolicySnapshot:
    doc = {"version": 1, "mode": mode, "fallthrough": fallthrough, "trust": {"keys": []},
           "rules": rules}
    return parse_policy(json.dumps(doc).encode(), "p.json")


def holes(s: PolicySnapshot) -> List[str]:
    return [w for w in s.warnings if HOLE in w]


GO_SIGNED = {"id": "go-signed", "action": "require-signature", "match": {"go": True}}
ALL_SIGNED = {"id": "signed", "action": "require-signature"}


def test_allow_rules_that_let_non_go_files_through_are_named() -> None:
    s = snap([{"id": "ops", "action": "allow", "match": {"uids": [0]}},
              {"id": "tools", "action": "allow", "match": {"paths": ["/opt/tools"]}},
              {"id": "go-tools", "action": "allow", "match": {"go": True, "uids": [7]}},
              GO_SIGNED,
              {"id": "scripts", "action": "allow", "match": {"go": False}},
              {"id": "unreachable", "action": "allow"}])
    found = holes(s)
    assert len(found) == 3
    assert "rules[0] (id ops)" in found[0] and "every executable that it matches, Go or not" \
        in found[0]
    assert "rules[1] (id tools)" in found[1]
    assert "rules[4] (id scripts): enforce mode, but this allow rule lets executables that " \
        "are not Go run without a signature" in found[2]
    assert all("docs/policy.md" in w for w in found)


def test_fallthrough_allow_is_named_unless_unreachable() -> None:
    assert holes(snap([GO_SIGNED], fallthrough="allow")) == [
        'fallthrough = "allow": enforce mode, but an executable in scope that no rule '
        'matches runs without a signature; require a signature for them, or keep the '
        'exception knowingly (docs/policy.md, "Enforce mode")']
    # a catch-all rule, or go = true and go = false catch-alls, leave nothing to fall through
    assert holes(snap([ALL_SIGNED], fallthrough="allow")) == []
    not_go = {"id": "not-go", "action": "require-signature", "match": {"go": False}}
    assert holes(snap([GO_SIGNED, not_go], fallthrough="allow")) == []
    # and nothing after a catch-all is reachable either
    later = {"id": "later", "action": "allow", "match": {"go": False}}
    assert holes(snap([ALL_SIGNED, later])) == []


def test_complete_and_monitor_policies_have_no_warning() -> None:
    assert holes(snap([GO_SIGNED, ALL_SIGNED])) == []
    assert holes(snap([{"id": "x", "action": "allow"}], mode="monitor",
                      fallthrough="allow")) == []
    # a rule-level monitor mode does not make an allow rule less of a hole
    assert len(holes(snap([{"id": "x", "action": "allow", "mode": "monitor"}]))) == 1


def test_the_default_policy_warns_only_with_mode_enforce() -> None:
    assert holes(default_policy()) == []
    enforced = holes(apply_overrides(default_policy(), mode="enforce"))
    assert len(enforced) == 1 and "(id not-go)" in enforced[0]
    assert enforced[0].startswith("line 29: rules[1]")


def test_the_shipped_enforce_template_has_no_hole() -> None:
    path = REPO / "packaging" / "policy-enforce.toml"
    s = parse_policy(path.read_bytes(), str(path))
    assert s.mode.value == "enforce" and holes(s) == []
    assert [r.rule_id for r in s.rules] == ["go-signed", "signed"]
    assert apply_overrides(s, scopes=["/srv/app"], keys=["/nonexistent-dir/"]).warnings == (
        "trust.keys[0]: key directory /nonexistent-dir/ does not exist",)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _file(tmp_path: Path, rules: str, mode: str = "enforce") -> Path:
    path = tmp_path / "p.toml"
    path.write_text(f'version = 2\nmode = "{mode}"\n[trust]\nkeys = []\n{rules}')
    return path


HOLEY = ('[[rules]]\nid = "go-signed"\naction = "require-signature"\nmatch = { go = true }\n'
         '[[rules]]\nid = "not-go"\naction = "allow"\nmatch = { go = false }\n')


def test_policy_lint_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    holey = _file(tmp_path, HOLEY)
    code, out, err = run(capsys, "policy", "lint", str(holey))
    assert (code, err) == (1, "")
    assert f"{holey}: WARNING: line 10: rules[1] (id not-go): enforce mode" in out
    code, out, _ = run(capsys, "policy", "lint", str(holey), "--mode", "monitor", "--json")
    assert code == 0 and json.loads(out)["warnings"] == []
    code, out, _ = run(capsys, "policy", "lint", str(REPO / "packaging/policy-enforce.toml"),
                       "--json")
    assert not [w for w in json.loads(out)["warnings"] if HOLE in w]
    code, out, _ = run(capsys, "policy", "lint", "--mode", "enforce", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["policy"] == "<embedded default policy>"
    assert any("(id not-go)" in w for w in doc["warnings"])
    bad = tmp_path / "bad.toml"
    bad.write_text("version = 1\nmdoe = 'enforce'\n")
    code, out, err = run(capsys, "policy", "lint", str(bad))
    assert code == 2 and "mdoe: unknown key" in err


def test_policy_build_and_verify_print_the_warning(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    src = _file(tmp_path, HOLEY)
    key = signing.generate()
    priv, pinned = tmp_path / "root.key", tmp_path / "pinned"
    priv.write_bytes(signing.plain_private_pem(key))
    pinned.mkdir()
    (pinned / "root.pub").write_bytes(signing.public_pem(key.public_key()))
    bundle = tmp_path / "p.bundle"
    code, _, err = run(capsys, "policy", "build", str(src), "-o", str(bundle))
    assert code == 0 and "WARNING: rules[1] (id not-go): enforce mode" in err
    assert run(capsys, "policy", "sign", str(bundle), "--key", str(priv))[0] == 0
    code, out, err = run(capsys, "policy", "verify", str(bundle), "--keys", str(pinned))
    assert code == 0 and "OK" in out and "(id not-go): enforce mode" in err
    code, out, _ = run(capsys, "policy", "verify", str(bundle), "--keys", str(pinned),
                       "--json")
    assert code == 0 and any("(id not-go)" in w for w in json.loads(out)["warnings"])
