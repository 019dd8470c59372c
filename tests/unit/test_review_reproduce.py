"""The ``execguard verify`` command built for a record: trust from the policy whose digest
matches, keyless identities, stores, rule notes, fingerprint fallback and placeholders."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Tuple

from agent import signing
from agent.errors import InputError, Reason
from agent.policy import PolicySnapshot, parse_policy
from agent.review import Candidate, load_candidates, reproduce
from agent.review.reproduce import expected_exit
from agent.verify.keys import load_public_key
from agent.verify.model import Evidence, SignatureKind
from tests.record_fixtures import make_decision

ISSUER = "https://token.actions.githubusercontent.com"
SAN = "https://github.com/acme/tool/.github/workflows/release.yml@refs/tags/v1"


def policy(tmp_path: Path) -> Tuple[PolicySnapshot, str, str]:
    key = tmp_path / "a.pub"
    key.write_bytes(signing.public_pem(signing.generate().public_key()))
    store = tmp_path / "store"
    store.mkdir()
    text = f"""version = 7
[trust]
keys = ["{key}"]
signature_stores = ["{store}"]
identities = [{{ issuer = "https://other.example", san_regex = ".*" }},
              {{ issuer = "{ISSUER}", san = "{SAN}" }}]

[[rules]]
id = "open"
action = "allow"
match = {{ paths = ["/usr/bin"] }}

[[rules]]
id = "go-release"
action = "require-signature"
"""
    return (parse_policy(text.encode(), str(tmp_path / "p.toml")), str(key),
            load_public_key(str(key)).fingerprint)


def test_trust_comes_from_the_policy_with_the_recorded_digest(tmp_path: Path) -> None:
    snap, key, _fp = policy(tmp_path)
    d = make_decision(0, policy_digest=snap.digest)  # keyless evidence, no-signature
    cands = [Candidate("other", parse_policy(b"version = 2\n", "o.toml")),
             Candidate("p.toml", snap)]
    r = reproduce(d, cands)
    assert r.policy_source == "p.toml" and r.placeholders == []
    assert r.argv == ["execguard", "verify", "/srv/app/bin/tool", "--key", key,
                      "--identity", SAN, "--issuer", ISSUER,
                      "--store", str(tmp_path / "store")]
    assert any("2 keyless identities" in n for n in r.notes)
    assert r.expected_exit == 1


def test_a_rule_without_a_signature_check_is_said(tmp_path: Path) -> None:
    snap, _key, _fp = policy(tmp_path)
    d = make_decision(0, allow=True, rule_id="open", policy_digest=snap.digest, evidence=None,
                      path="/usr/bin/ls")
    r = reproduce(d, [Candidate("p", snap)])
    assert any("rule open is 'allow'" in n for n in r.notes)
    assert r.expected_exit is None


def test_without_the_policy_a_key_is_found_by_fingerprint(tmp_path: Path) -> None:
    snap, key, fp = policy(tmp_path)
    ev = Evidence(SignatureKind.COSIGN_SIG, "/srv/app/bin/tool.sig", fp)
    d = make_decision(0, allow=True, reason=Reason.OK, evidence=ev,
                      policy_digest="sha256:" + "00" * 32)
    r = reproduce(d, [Candidate("p", snap)])
    assert r.argv[3:] == ["--key", key] and r.policy_source is None
    assert r.expected_exit == 0 and r.placeholders == []
    assert any("was not found among: p" in n for n in r.notes)
    unknown = reproduce(replace(d, evidence=replace(ev, key_fingerprint="SHA256:zz")), [])
    assert unknown.argv[3:] == ["--key", "<TRUSTED-KEY.pem>"]
    assert unknown.placeholders and "SHA256:zz" in unknown.placeholders[0]
    keyless = reproduce(make_decision(0, policy_digest=None), [])
    assert keyless.argv[3:] == ["--identity", SAN, "--issuer", ISSUER,
                                "--trusted-root", "<TRUSTED-ROOT.json>"]
    assert any("not recorded" in n for n in keyless.notes)


def test_expected_exit_by_reason() -> None:
    assert expected_exit(make_decision(0, reason=Reason.BAD_SIGNATURE)) == 1
    assert expected_exit(make_decision(0, reason=Reason.GO_PREDICATE)) == 0
    assert expected_exit(make_decision(0, allow=True)) == 0
    assert expected_exit(make_decision(0, allow=True, evidence=None)) is None
    assert expected_exit(make_decision(0, reason=Reason.POLICY_DENY)) is None
    assert expected_exit(make_decision(0, reason=Reason.VERIFY_FAILED)) is None


def test_load_candidates_keeps_errors_and_skips_absent() -> None:
    def broken() -> PolicySnapshot:
        raise InputError("/etc/x.toml", "Permission denied")

    cands = load_candidates([("absent", lambda: None), ("broken", broken)])
    assert [(c.label, c.error) for c in cands] == [("broken", "/etc/x.toml: Permission denied")]
