"""Evaluation and decisions: rule order, scope, matches, and ``decide`` with the real offline
verifier over Go binaries signed here by OpenSSL.

Test strategy summary: ``evaluate`` is checked on plain subjects; ``decide`` gets the real
``verify_artifact`` as ``verify_fn`` (wrapped to count calls), so a passing test means real
signature bytes verified under the trust the policy narrowed. The only fakes are two
deliberately broken ``verify_fn`` seams: one that raises and one that lies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest

from agent.decision import Source
from agent.errors import InputError, MalformedInput, Reason
from agent.policy import Action, Mode, Subject, decide, evaluate, parse_policy
from agent.policy.model import PolicySnapshot
from agent.verify.keys import load_public_key
from agent.verify.model import Evidence, SignatureKind, TrustConfig, Verdict
from tests.policy_fixtures import Material, copy_signed, material_fixture, verifier  # noqa: F401


def policy(rules: List[Dict[str, Any]], **top: Any) -> PolicySnapshot:
    document = {"version": 1, "trust": {"keys": []}, **top, "rules": rules}
    return parse_policy(json.dumps(document).encode(), "test.json")


def plain(path: str, uid: int = 1000, go: bool = False) -> Subject:
    return Subject(path, uid, go)


def test_first_matching_rule_wins() -> None:
    deny_tmp = {"id": "deny-tmp", "action": "deny", "match": {"paths": ["/opt/app/tmp"]}}
    allow_app = {"id": "allow-app", "action": "allow", "match": {"paths": ["/opt/app"]}}
    snap = policy([deny_tmp, allow_app])
    result = evaluate(snap, plain("/opt/app/tmp/x"))
    assert (result.action, result.rule_id, result.reason) == (Action.DENY, "deny-tmp",
                                                              Reason.POLICY_DENY)
    assert "deny-tmp (line 1)" in result.detail  # JSON on one line: the rule's line is 1
    assert evaluate(snap, plain("/opt/app/bin/x")).rule_id == "allow-app"
    swapped = policy([allow_app, deny_tmp])
    assert evaluate(swapped, plain("/opt/app/tmp/x")).action is Action.ALLOW


def test_scope_and_fallthrough() -> None:
    snap = policy([{"id": "a", "action": "allow", "match": {"paths": ["/opt/app/ok"]}}],
                  scopes=["/opt/app"])
    outside = evaluate(snap, plain("/usr/bin/ls"))
    assert (outside.action, outside.in_scope, outside.rule_id) == (Action.ALLOW, False, None)
    decided = decide(snap, plain("/usr/bin/ls"), lambda t: Verdict.fail(Reason.NO_SIGNATURE, ""))
    assert (decided.allow, decided.in_scope, decided.source) == (True, False, Source.DEFAULT)
    fell = evaluate(snap, plain("/opt/app/other"))
    assert (fell.action, fell.reason, fell.rule_id) == (Action.DENY, Reason.NO_RULE, None)
    opened = policy([], scopes=["/opt/app"], fallthrough="allow")
    assert evaluate(opened, plain("/opt/app/other")).action is Action.ALLOW
    assert snap.scope_roots() == ("/opt/app",)
    assert policy([], scopes=["/opt/a", "/opt/a/b/*", "/srv/**/bin", "/"]).scope_roots() == ("/",)


def test_uid_go_and_module_matches(material: Material) -> None:
    snap = policy([
        {"id": "root-any", "action": "allow", "match": {"uids": [0]}},
        {"id": "app-module", "action": "deny", "match": {"go": True, "module": "example.com/a*"}},
        {"id": "go", "action": "allow", "match": {"go": True}},
        {"id": "not-go", "action": "deny", "match": {"go": False}},
    ])
    app, tool = material.bins["app"].info, material.bins["tool"].info
    assert evaluate(snap, Subject("/x", 0, True, app)).rule_id == "root-any"
    assert evaluate(snap, Subject("/x", 5, True, app)).rule_id == "app-module"
    assert evaluate(snap, Subject("/x", 5, True, tool)).rule_id == "go"
    assert evaluate(snap, Subject("/x", 5, True, None)).rule_id == "go"  # unreadable build info
    assert evaluate(snap, Subject("/x", 5, False)).rule_id == "not-go"


def test_subject_is_checked() -> None:
    with pytest.raises(ValueError, match="absolute"):
        Subject("relative/path", 0)


@pytest.fixture()
def keydir(material: Material, tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    d.mkdir()
    for name, pub in material.keys.items():
        (d / f"{name}.pub").write_bytes(pub.read_bytes())
    (d / "README").write_text("not a key: ignored")
    return d


def signed_policy(material: Material, keydir: Path, mode: str = "enforce") -> PolicySnapshot:
    return policy([
        {"id": "go-signed", "action": "require-signature", "match": {"go": True},
         "go": {"deny_vcs_modified": True, "min_version": "1.18",
                "module_signers": [{"module": "example.com/app",
                                    "keys": [str(material.keys["a"])]}]}},
        {"id": "rest", "action": "allow"},
    ], mode=mode, trust={"keys": [str(keydir)]})


class Counting:
    def __init__(self, path: Path) -> None:
        self.verify = verifier(path)
        self.calls: List[TrustConfig] = []

    def __call__(self, trust: TrustConfig) -> Verdict:
        self.calls.append(trust)
        verdict: Verdict = self.verify(trust)
        return verdict


def test_decide_with_real_signatures(material: Material, keydir: Path, tmp_path: Path) -> None:
    snap = signed_policy(material, keydir)
    key_a = load_public_key(str(material.keys["a"]))
    # the catch-all allow after the Go rule is an enforce-mode hole, and is named as one
    assert len(snap.trust.keys) == 2 and len(snap.warnings) == 1
    assert "rules[1] (id rest): enforce mode, but this allow rule lets every executable, " \
        "Go or not, run without a signature" in snap.warnings[0]

    def run(name: str, key: str | None) -> Any:
        path = copy_signed(material.bins[name], tmp_path / f"{name}-{key}",
                           material.private[key] if key else None)
        fn = Counting(path)
        return decide(snap, Subject(str(path), 1000, True, material.bins[name].info), fn), fn

    ok, fn = run("app", "a")
    assert (ok.allow, ok.reason, ok.rule_id, ok.source) == (True, Reason.OK, "go-signed",
                                                            Source.VERIFY)
    assert ok.verdict is not None and ok.verdict.evidence is not None
    assert ok.verdict.evidence.key_fingerprint == key_a.fingerprint
    assert [k.fingerprint for k in fn.calls[0].keys] == [key_a.fingerprint]  # narrowed by pin

    # b is trusted globally, but example.com/app pins a. A bare .sig names no key, so the
    # verifier (given only a) reports a signature that no trusted key verifies.
    wrong_signer, _ = run("app", "b")
    assert (wrong_signer.allow, wrong_signer.reason) == (False, Reason.BAD_SIGNATURE)
    assert wrong_signer.blocks

    dirty, _ = run("app-dirty", "a")
    assert (dirty.allow, dirty.reason) == (False, Reason.GO_PREDICATE)
    assert "vcs.modified=true" in dirty.detail

    unsigned_dirty, _ = run("app-dirty", None)  # predicates only after a trusted signature
    assert unsigned_dirty.reason is Reason.NO_SIGNATURE

    tool, fn = run("tool", "b")
    assert tool.allow and len(fn.calls[0].keys) == 2  # no pin: the whole trust set

    script = Counting(material.script)
    outcome = decide(snap, Subject(str(material.script), 1000, False), script)
    assert (outcome.allow, outcome.rule_id, outcome.source) == (True, "rest", Source.RULE)
    assert script.calls == []  # verification only when a rule needs it


def test_monitor_mode_reports_but_never_blocks(material: Material, keydir: Path,
                                               tmp_path: Path) -> None:
    snap = signed_policy(material, keydir, mode="monitor")
    path = copy_signed(material.bins["app"], tmp_path, None)
    outcome = decide(snap, Subject(str(path), 0, True, material.bins["app"].info), verifier(path))
    assert (outcome.allow, outcome.reason, outcome.mode) == (False, Reason.NO_SIGNATURE,
                                                             Mode.MONITOR)
    assert not outcome.blocks
    assert snap.effective_on_timeout is Action.ALLOW


def test_rule_signers_narrow_the_trust(material: Material, keydir: Path, tmp_path: Path) -> None:
    fp_a = load_public_key(str(material.keys["a"])).fingerprint
    snap = policy([{"id": "only-a", "action": "require-signature", "signers": {"keys": [fp_a]}}],
                  mode="enforce", trust={"keys": [str(keydir)]})
    rule = snap.rule("only-a")
    assert rule is not None and rule.trust is not None
    assert [k.fingerprint for k in rule.trust.keys] == [fp_a]
    bin_ = material.bins["tool"]
    by_b = copy_signed(bin_, tmp_path / "b", material.private["b"])
    outcome = decide(snap, Subject(str(by_b), 0, True, bin_.info), verifier(by_b))
    assert (outcome.allow, outcome.reason) == (False, Reason.BAD_SIGNATURE)
    by_a = copy_signed(bin_, tmp_path / "a", material.private["a"])
    assert decide(snap, Subject(str(by_a), 0, True, bin_.info), verifier(by_a)).allow


def test_rule_key_file_trusts_that_key_for_the_rule(material: Material, tmp_path: Path) -> None:
    snap = policy([{"id": "by-file", "action": "require-signature",
                    "signers": {"keys": [str(material.keys["b"])]}}])
    assert snap.trust.keys == ()
    path = copy_signed(material.bins["tool"], tmp_path, material.private["b"])
    assert decide(snap, Subject(str(path), 0, True, material.bins["tool"].info),
                  verifier(path)).allow


def test_module_pin_key_must_be_trusted_by_the_rule(material: Material) -> None:
    with pytest.raises(MalformedInput, match=r"go.module_signers\[0\].keys\[0\]: key sha256:"):
        policy([{"id": "pin", "action": "require-signature", "match": {"go": True},
                 "go": {"module_signers": [{"module": "x/*",
                                            "keys": [str(material.keys["a"])]}]}}])


def test_broken_verify_fn_never_allows(material: Material, keydir: Path) -> None:
    snap = signed_policy(material, keydir)
    subject = Subject("/opt/app", 0, True, material.bins["tool"].info)

    def raises(trust: TrustConfig) -> Verdict:
        raise InputError("/opt/app", "No such file or directory")

    outcome = decide(snap, subject, raises)
    assert (outcome.allow, outcome.reason) == (False, Reason.VERIFY_FAILED)
    assert "No such file" in outcome.detail

    def lies(trust: TrustConfig) -> Verdict:  # "trusted", by a key the trust never had
        evidence = Evidence(SignatureKind.COSIGN_SIG, "x.sig", key_fingerprint="sha256:" + "0" * 64)
        return Verdict.ok(evidence, "trust me")

    outcome = decide(snap, subject, lies)
    assert (outcome.allow, outcome.reason) == (False, Reason.UNTRUSTED_KEY)


def test_keyless_pin_must_satisfy_the_rule_identities_too(material: Material) -> None:
    issuer = "https://token.actions.githubusercontent.com"
    snap = policy([
        {"id": "ci", "action": "require-signature", "match": {"go": True},
         "go": {"module_signers": [{"module": "example.com/app", "identities": [
             {"issuer": issuer, "san_regex": r"https://github\.com/acme/app/.*"}]}]}},
    ], trust={"keys": [], "identities": [{"issuer": issuer,
                                          "san_regex": r"https://github\.com/acme/.*@refs/tags/.*"}]})
    subject = Subject("/opt/app", 0, True, material.bins["app"].info)

    def signed_by(san: str) -> Any:
        def verify(trust: TrustConfig) -> Verdict:
            # The pin's identity is what verification was asked to trust.
            assert [r.san_regex for r in trust.identities] == [r"https://github\.com/acme/app/.*"]
            ev = Evidence(SignatureKind.BUNDLE_KEYLESS, "b.json", identity=san, issuer=issuer)
            return Verdict.ok(ev, f"signed by {san}")
        return verify

    tagged = "https://github.com/acme/app/.github/workflows/r.yml@refs/tags/v1"
    assert decide(snap, subject, signed_by(tagged)).allow
    branch = "https://github.com/acme/app/.github/workflows/r.yml@refs/heads/main"
    outcome = decide(snap, subject, signed_by(branch))  # the pin accepts it, the rule does not
    assert (outcome.allow, outcome.reason) == (False, Reason.IDENTITY_MISMATCH)
