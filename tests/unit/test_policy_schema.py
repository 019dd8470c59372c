"""Policy loading: every schema error names its key, bad files fail clearly, digests are stable.

Test strategy summary: a table of broken documents, each with the substring its error must
contain (like fapolicyd's ``err_cases``); real files on disk for the read errors (FIFO,
directory, oversize, not UTF-8); the same policy written as TOML and as JSON (with different
whitespace and key order) must give one digest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

import pytest

from agent.errors import InputError, MalformedInput
from agent.policy import Action, Mode, load_policy, parse_policy
from agent.policy.load import MAX_POLICY_BYTES, rule_lines

BASE: Dict[str, Any] = {"version": 1, "trust": {"keys": []}}


def doc(**top: Any) -> Dict[str, Any]:
    return {**BASE, **top}


def rule(**fields: Any) -> Dict[str, Any]:
    return {"id": "r1", "action": "allow", **fields}


def matching(**match: Any) -> Dict[str, Any]:
    return doc(rules=[rule(match=match)])


def parse(document: Any) -> Any:
    return parse_policy(json.dumps(document).encode(), "/etc/execguard/test.json")


# (document, substring the message must contain)
ERRORS = [
    ({"trust": {"keys": []}}, "version: required key is missing"),
    (doc(version="1"), "version: expected an integer, got a string '1'"),
    (doc(version=True), "version: expected an integer, got a boolean"),
    (doc(version=-1), "version: -1 is out of range"),
    (doc(mode="enforcing"), "mode: expected 'monitor' or 'enforce'"),
    (doc(mdoe="enforce"), "mdoe: unknown key (known keys: boundary, description, fallthrough"),
    (doc(scopes="/opt"), "scopes: expected an array, got a string"),
    (doc(scopes=[]), "scopes: must not be empty"),
    (doc(scopes=["opt/app"]), "scopes[0]: bad path glob: 'opt/app' is not an absolute"),
    (doc(scopes=["/opt/[abc"]), "scopes[0]: bad path glob: unterminated '['"),
    (doc(scopes=["/opt/a**"]), "scopes[0]: bad path glob: '**' must be a whole path segment"),
    (doc(scopes=["/opt/../etc"]), "scopes[0]: bad path glob"),
    (doc(on_timeout="block"), "on_timeout: expected 'allow' or 'deny'"),
    (doc(fallthrough="require-signature"), "fallthrough: expected 'allow' or 'deny'"),
    (doc(state_dir="var/lib"), "state_dir: 'var/lib' is not an absolute path"),
    (doc(log_dir=5), "log_dir: expected a string"),
    (doc(limits={"decision_deadline_ms": 0}), "limits.decision_deadline_ms: 0 is out of range"),
    (doc(limits={"max_file_bytes": 1.5}), "limits.max_file_bytes: expected an integer, got a fl"),
    (doc(limits={"deadline": 5}), "limits.deadline: unknown key"),
    (doc(trust={"keys": "/k"}), "trust.keys: expected an array"),
    (doc(trust={"keys": [], "identities": [{"san": "x"}]}),
     "trust.identities[0].issuer: required key is missing"),
    (doc(trust={"keys": [], "identities": [{"issuer": "https://i"}]}),
     "trust.identities[0]: give exactly one of san or san_regex"),
    (doc(trust={"keys": [], "identities": [{"issuer": "https://i", "san": "a", "san_regex": "b"}]}),
     "trust.identities[0]: give exactly one of san or san_regex"),
    (doc(trust={"keys": [], "identities": [{"issuer": "https://i", "san_regex": "(x"}]}),
     "trust.identities[0].san_regex: bad regular expression '(x'"),
    (doc(trust={"keys": [], "trusted_root": "root.json"}), "trust.trusted_root: 'root.json' is"),
    (doc(rules={"id": "x"}), "rules: expected an array of rule tables"),
    (doc(rules=[{"action": "allow"}]), "rules[0].id: required key is missing"),
    (doc(rules=[rule(action="permit")]), "(id r1).action: expected one of 'allow', 'deny', 'requ"),
    (doc(rules=[{"id": "r1"}]), "rules[0] (id r1).action: required key is missing"),
    (doc(rules=[rule(id="has space")]), "rules[0] (id has space).id: 'has space': use 1-64"),
    (doc(rules=[rule(), rule()]), "rules[1] (id r1).id: duplicate id, first used by rules[0]"),
    (matching(go="yes"), 'rules[0] (id r1).match.go: expected true, false or "any"'),
    (matching(uids=[0, -1]), "rules[0] (id r1).match.uids[1]: -1 is out of range"),
    (matching(uids=[]), "rules[0] (id r1).match.uids: must not be empty"),
    (matching(uids=["root"]), "match.uids[0]: expected an integer, got a string"),
    (matching(paths=["*.sh"]), "match.paths[0]: bad path glob"),
    (matching(module="/example.com"), "match.module: bad module glob"),
    (matching(modul="x"), "rules[0] (id r1).match.modul: unknown key"),
    (matching(go=False, module="x/*"),
     "match.module: a module glob never matches a non-Go file"),
    (doc(rules=[rule(signers={"keys": ["sha256:" + "0" * 64]})]),
     "rules[0] (id r1).signers: only a require-signature rule takes signers"),
    (doc(rules=[rule(action="deny", go={"min_version": "1.21"})]),
     "rules[0] (id r1).go: only a require-signature rule takes go"),
    (doc(rules=[rule(action="require-signature", go={"min_version": "1.21"})]),
     "rules[0] (id r1).go: Go predicates need match.go = true"),
    (doc(rules=[rule(action="require-signature", match={"go": True}, go={})]),
     "rules[0] (id r1).go: sets no Go predicate"),
    (doc(rules=[rule(action="require-signature", match={"go": True},
                     go={"min_version": "one.twenty"})]),
     "go.min_version: 'one.twenty' is not a Go version"),
    (doc(rules=[rule(action="require-signature", match={"go": True},
                     go={"deny_vcs_modified": "yes"})]),
     "go.deny_vcs_modified: expected true or false"),
    (doc(rules=[rule(action="require-signature", match={"go": True},
                     go={"deny_modules": [{"path": "golang.org/x/net"}]})]),
     "go.deny_modules[0]: give versions and/or below"),
    (doc(rules=[rule(action="require-signature", match={"go": True},
                     go={"deny_modules": [{"path": "x", "below": "1.2"}]})]),
     "go.deny_modules[0].below: '1.2' is not a module version"),
    (doc(rules=[rule(action="require-signature", match={"go": True},
                     go={"module_signers": [{"module": "example.com/*"}]})]),
     "go.module_signers[0]: names no key and no identity"),
    (doc(rules=[rule(action="require-signature", signers={})]),
     "rules[0] (id r1).signers: names no key and no identity"),
    (doc(rules=[rule(action="require-signature", signers={"keys": ["sha256:ABC"]})]),
     "signers.keys[0]: 'sha256:ABC' is not sha256: followed by 64 lowercase hex"),
    (doc(rules=[rule(action="require-signature", signers={"keys": ["key.pub"]})]),
     "signers.keys[0]: 'key.pub' is not an absolute path"),
    ([1, 2], "expected a table, got an array"),
]


@pytest.mark.parametrize(("document", "message"), ERRORS, ids=[e[1][:50] for e in ERRORS])
def test_schema_error_names_the_key(document: Any, message: str) -> None:
    with pytest.raises(MalformedInput) as info:
        parse(document)
    assert info.value.path == "/etc/execguard/test.json"
    assert message in info.value.problem, info.value.problem


def test_missing_files_named_by_the_policy_are_load_errors(tmp_path: Path) -> None:
    with pytest.raises(MalformedInput, match=r"trust.keys\[0\]: .*/nope.pub: No such file"):
        parse(doc(trust={"keys": [str(tmp_path / "nope.pub")]}))
    with pytest.raises(MalformedInput, match=r"trust.trusted_root: .*root.json: No such file"):
        parse(doc(trust={"keys": [], "trusted_root": str(tmp_path / "root.json")}))
    with pytest.raises(MalformedInput, match=r"trust.signature_stores\[0\]: .*does not exist"):
        parse(doc(trust={"keys": [], "signature_stores": [str(tmp_path / "store")]}))
    private = tmp_path / "k.pem"
    private.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(MalformedInput, match=r"trust.keys\[0\]: .*is a private key"):
        parse(doc(trust={"keys": [str(tmp_path)]}))  # a key directory with a private key in it


def test_fingerprint_must_name_a_trusted_key() -> None:
    fp = "sha256:" + "ab" * 32
    with pytest.raises(MalformedInput, match=rf"rules\[0\] \(id r1\).signers.keys\[0\]: key {fp} "
                                             "is not trusted here"):
        parse(doc(rules=[rule(action="require-signature", signers={"keys": [fp]})]))


def test_missing_key_directory_is_a_warning_not_an_error(tmp_path: Path) -> None:
    snap = parse(doc(trust={"keys": [str(tmp_path / "keys") + "/"]}))
    assert snap.trust.keys == ()
    assert any("does not exist" in w for w in snap.warnings)


BAD_TEXT = [
    (b"version = 1\nmode = \n", "x.toml", "not valid TOML: "),
    (b'{"version": 1,}', "x.json", "not valid JSON: "),
    (b'{"version": 1, "version": 2}', "x.json", "duplicate key 'version'"),
    (b'{"version": NaN}', "x.json", "NaN is not allowed"),
    (b"version = 1\nwhen = 1979-05-27\n", "x.toml", "when: unknown key"),
    (b"\xff\xfeversion = 1", "x.toml", "not UTF-8 text"),
    (b"version = 1\n[limits]\nmax_file_bytes = 1e9\n", "x.toml", "expected an integer, got a fl"),
    (b'{"version": 1, "description": "\\udcff"}', "x.json", "description: string is not valid"),
    (b'{"a":' * 100_000, "x.json", "not valid JSON: nested too deeply"),
    (b"x = " + b"[" * 100_000, "x.toml", "not valid TOML: nested too deeply"),
    (b"version = 1\nstate_dir = 1979-05-27\n", "x.toml", "state_dir: expected a string, got a d"),
]


@pytest.mark.parametrize(("data", "name", "message"), BAD_TEXT)
def test_bad_text(data: bytes, name: str, message: str) -> None:
    with pytest.raises(MalformedInput) as info:
        parse_policy(data, name)
    assert info.value.path == name
    assert message in info.value.problem


def test_file_read_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="No such file"):
        load_policy(str(tmp_path / "missing.toml"))
    with pytest.raises(InputError, match="is a directory, not a policy"):
        load_policy(str(tmp_path))
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # a FIFO must not hang the loader
    with pytest.raises(InputError, match="is not a regular file"):
        load_policy(str(fifo))
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (MAX_POLICY_BYTES + 1))
    with pytest.raises(MalformedInput, match="larger than"):
        load_policy(str(big))


TOML_POLICY = """\
version = 7
mode = "enforce"
scopes = ["/opt/app", "/srv/**/bin"]

[trust]
keys = []

[[rules]]
id = "deny-tmp"
action = "deny"
match = { paths = ["/opt/app/tmp"] }

[[rules]]
id = "go"
action = "require-signature"
[rules.match]
go = true
[rules.go]
min_version = "1.19"
deny_vcs_modified = true

[[rules]]
id = "rest"
action = "allow"
"""

JSON_POLICY = """{"rules": [
  {"action": "deny", "id": "deny-tmp", "match": {"paths": ["/opt/app/tmp"]}},
  {"id": "go", "action": "require-signature", "match": {"go": true},
   "go": {"deny_vcs_modified": true, "min_version": "1.19"}},
  {"id": "rest", "action": "allow"}],
 "trust": {"keys": []}, "scopes": ["/opt/app", "/srv/**/bin"], "mode": "enforce",
 "version": 7}"""


def test_toml_and_json_twins_share_a_digest(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(TOML_POLICY)
    (tmp_path / "p.json").write_text(JSON_POLICY)
    a, b = load_policy(str(tmp_path / "p.toml")), load_policy(str(tmp_path / "p.json"))
    assert a.digest == b.digest and a.digest.startswith("sha256:")
    assert a.canonical == b.canonical
    assert (a.version, a.mode, [r.rule_id for r in a.rules]) == (7, Mode.ENFORCE,
                                                                  ["deny-tmp", "go", "rest"])
    assert [r.action for r in a.rules] == [Action.DENY, Action.REQUIRE_SIGNATURE, Action.ALLOW]
    # Same content again gives the same digest; any change of meaning changes it.
    assert parse_policy(TOML_POLICY.encode(), "again.toml").digest == a.digest
    changed = parse_policy(TOML_POLICY.replace('"1.19"', '"1.20"').encode(), "c.toml")
    assert changed.digest != a.digest
    # Spelling out a default does not change the meaning, so not the digest either.
    explicit = TOML_POLICY.replace("version = 7\n", 'version = 7\non_timeout = "deny"\n')
    assert parse_policy(explicit.encode(), "e.toml").digest == a.digest


def test_rules_know_their_source_lines(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(TOML_POLICY)
    snap = load_policy(str(tmp_path / "p.toml"))
    lines = TOML_POLICY.splitlines()
    for r in snap.rules:
        assert r.source_line is not None
        assert f'id = "{r.rule_id}"' in lines[r.source_line - 1]
    assert [r.source_line for r in parse_policy(JSON_POLICY.encode(), "p.json").rules] == [2, 3, 5]
    assert rule_lines('id = "a"\n', ["a", "missing"]) == [1, None]


def test_no_partial_policy_on_error() -> None:
    bad = TOML_POLICY.replace('deny_vcs_modified = true', 'deny_vcs_modified = "no"')
    with pytest.raises(MalformedInput, match=r"rules\[1\] \(id go\).go.deny_vcs_modified"):
        parse_policy(bad.encode(), "bad.toml")


def test_rule_errors_name_the_rule_line() -> None:
    """Schema errors and load errors inside a rule name the line of the rule: the line of
    its ``id`` (as ``Rule.source_line``), or of its ``[[rules]]`` header when it has none."""
    text = ('version = 1\n[trust]\nkeys = []\n\n[[rules]]\nid = "a"\naction = "allow"\n\n'
            '[[rules]]\nid = "b"\naction = "require-signature"\nmatch = { go = true }\n'
            '[rules.go]\nmin_version = "one.twenty"\n')
    with pytest.raises(MalformedInput) as err:
        parse_policy(text.encode(), "p.toml")
    assert "p.toml: line 10: rules[1] (id b).go.min_version" in str(err.value)
    no_id = text.replace('id = "b"\n', "")
    with pytest.raises(MalformedInput, match=r"line 9: rules\[1\]\.id: required key"):
        parse_policy(no_id.encode(), "p.toml")
    as_json = json.dumps(doc(rules=[rule(id="a"), rule(id="b", match={"gids": "x"})]),
                         indent=1)
    with pytest.raises(MalformedInput) as err:
        parse_policy(as_json.encode(), "p.json")
    line = as_json.splitlines().index('   "id": "b",') + 1
    assert f"line {line}: rules[1] (id b).match.gids: expected an array" in str(err.value)
    # a file the rule names (a load error, after the schema): the rule's line too
    missing = text.replace('min_version = "one.twenty"',
                           'module_signers = [{ module = "x/*", keys = ["/nonexistent.pub"] }]')
    with pytest.raises(MalformedInput, match=r"line 10: rules\[1\] \(id b\)\.go\.module_signers"):
        parse_policy(missing.encode(), "p.toml")
    # outside the rules: the key alone
    with pytest.raises(MalformedInput) as err:
        parse_policy(b'version = 1\nmdoe = "x"\n', "p.toml")
    assert "line" not in str(err.value) and "mdoe: unknown key" in str(err.value)
