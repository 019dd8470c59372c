"""Keyless signer requirements: Fulcio certificate extensions and the ``{module_repo}``
binding of a Go module to the repository whose workflow signed it.

What is real: certificates are built with ``cryptography`` and carry the extensions in
Fulcio's encodings (raw text for 1.1-1.6, DER UTF8String from 1.8 on); the policy is parsed
by the real loader. Certificates made by the real sigstore-js client and verified end to end
are in tests/integration/test_policy_fulcio_claims.py.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Dict, List, Optional, Tuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.cache_wire import decode, encode
from agent.decision import FileIdentity
from agent.errors import MalformedInput, Reason
from agent.policy import parse_policy
from agent.policy.model import SignerSpec, trust_digest
from agent.policy.templates import module_repo
from agent.verify.fulcio_ext import ARC, NAMES, fulcio_extensions
from agent.verify.legacy_bundle import match_identity
from agent.verify.model import Evidence, IdentityRule, SignatureKind, TrustConfig, Verdict

ISSUER = "https://token.actions.githubusercontent.com"
SAN = "https://github.com/acme/app/.github/workflows/release.yml@refs/tags/v1.2.0"
REPO_URI = NAMES["source_repository_uri"]
REF = NAMES["source_repository_ref"]


def der_utf8(text: str) -> bytes:
    data = text.encode()
    if len(data) < 0x80:
        return bytes([0x0C, len(data)]) + data
    size = len(data).to_bytes((len(data).bit_length() + 7) // 8, "big")  # DER: minimal
    return bytes([0x0C, 0x80 | len(size)]) + size + data


def certificate(extensions: List[Tuple[str, bytes]], san: str = SAN) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(name)
               .public_key(key.public_key()).serial_number(1)
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(minutes=10))
               .add_extension(x509.SubjectAlternativeName(
                   [x509.UniformResourceIdentifier(san)]), critical=True))
    for oid, value in extensions:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
    return builder.sign(key, hashes.SHA256())


GITHUB = [
    (ARC + "1", ISSUER.encode()),  # legacy: raw text
    (ARC + "6", b"refs/tags/v1.2.0"),  # legacy GitHub Workflow Ref
    (ARC + "8", der_utf8(ISSUER)),
    (ARC + "9", der_utf8(SAN)),
    (REPO_URI, der_utf8("https://github.com/acme/app")),
    (REF, der_utf8("refs/tags/v1.2.0")),
    (ARC + "21", der_utf8("https://github.com/acme/app/actions/runs/1/attempts/1" + "x" * 200)),
]


def test_extensions_are_decoded_in_both_encodings() -> None:
    got = dict(fulcio_extensions(certificate(GITHUB)))
    assert got[ARC + "1"] == ISSUER and got[ARC + "8"] == ISSUER
    assert got[ARC + "6"] == "refs/tags/v1.2.0" and got[REF] == "refs/tags/v1.2.0"
    assert got[REPO_URI] == "https://github.com/acme/app"
    assert got[ARC + "21"].endswith("x" * 200)  # long-form DER length
    order = [int(oid.rsplit(".", 1)[1]) for oid in got]
    assert order == sorted(order)


def test_undecodable_values_are_left_out() -> None:
    bad = [(REPO_URI, b"https://github.com/acme/app"),  # not DER: left out, not guessed
           (REF, der_utf8("refs/heads/main") + b"\x00"),  # trailing bytes
           (ARC + "13", b""),
           (ARC + "11", bytes([0x13, 3]) + b"abc"),  # PrintableString, not UTF8String
           (ARC + "10", bytes([0x0C, 0x81, 3]) + b"abc"),  # long length form for 3: not DER
           (ARC + "2", b"\xff\xfe"),  # legacy but not UTF-8
           (ARC + "20", der_utf8("push")),
           ("1.3.6.1.4.1.57264.2.1", der_utf8("other arc"))]
    assert dict(fulcio_extensions(certificate(bad))) == {ARC + "20": "push"}


# -- IdentityRule ---------------------------------------------------------------------------

def test_identity_rule_needs_every_extension_value() -> None:
    exts = dict(fulcio_extensions(certificate(GITHUB)))
    rule = IdentityRule(ISSUER, san_regex=r"https://github\.com/acme/.*",
                        extensions=((REPO_URI, "https://github.com/acme/app"),),
                        extensions_regex=((REF, r"refs/tags/v\d+\.\d+\.\d+"),))
    assert rule.matches(SAN, ISSUER, exts)
    assert not rule.matches(SAN, ISSUER, {})  # extensions absent: no match
    assert not rule.matches(SAN, ISSUER, dict(exts, **{REF: "refs/heads/main"}))
    assert not rule.matches(SAN, ISSUER, dict(exts, **{REPO_URI: "https://github.com/acme/ap"}))
    assert not rule.matches(SAN, "https://accounts.google.com", exts)
    assert "source" not in rule.describe() and REPO_URI in rule.describe()


def test_match_identity_reads_extensions_from_the_certificate() -> None:
    wanted = IdentityRule(ISSUER, san=SAN, extensions=((REF, "refs/tags/v1.2.0"),))
    other = IdentityRule(ISSUER, san=SAN, extensions=((REF, "refs/tags/v9"),))
    cert = certificate(GITHUB)
    assert match_identity(cert, (other, wanted))[2] == wanted
    assert match_identity(cert, (other,))[2] is None


# -- {module_repo} ----------------------------------------------------------------------------

@pytest.mark.parametrize("module,repo", [
    ("github.com/acme/app", "github.com/acme/app"),
    ("github.com/acme/app/v2", "github.com/acme/app"),
    ("github.com/Acme-Corp/app.go/cmd/tool", "github.com/Acme-Corp/app.go"),
    ("github.com/acme", None),  # no repository segment
    ("gitlab.com/acme/app", None),  # other hosts: not derivable, fail closed
    ("example.com/acme/app", None),
    ("GitHub.com/acme/app", None),
    ("github.com/-acme/app", None),
    ("github.com/acme/..", None),
    ("github.com/acme/app.git", None),
    ("github.com/ac%me/app", None),
    ("github.com//app", None),
    (None, None),
])
def test_module_repo_derivation(module: Optional[str], repo: Optional[str]) -> None:
    assert module_repo(module) == repo


def test_templates_bind_to_the_module_and_fail_closed() -> None:
    template = IdentityRule(ISSUER, san_regex=r"https://{module_repo}/\.github/workflows/.*",
                            extensions=((REPO_URI, "https://{module_repo}"),))
    assert template.templated and not template.matches(SAN, ISSUER, {REPO_URI: "x"})
    spec = SignerSpec((), (template,))
    exts = dict(fulcio_extensions(certificate(GITHUB)))
    evidence = Evidence(SignatureKind.BUNDLE_KEYLESS, "b", identity=SAN, issuer=ISSUER,
                        extensions=tuple(sorted(exts.items())))
    assert spec.bind("github.com/acme/app/v2").accepts(evidence)
    assert not spec.bind("github.com/acme/other").accepts(evidence)
    assert not spec.bind("example.com/acme/app").identities  # dropped: trusts nobody
    assert not spec.accepts(evidence)  # an unbound template never matches
    dotted = SignerSpec((), (IdentityRule(ISSUER, san_regex="https://{module_repo}/.*"),))
    # the repository is escaped inside a regex: "." in it is no wildcard
    assert not dotted.bind("github.com/a.b/c").accepts(
        Evidence(SignatureKind.BUNDLE_KEYLESS, "b", identity="https://github.com/aXb/c/w",
                 issuer=ISSUER))


# -- the policy language ----------------------------------------------------------------------

def policy(identities: List[Dict[str, Any]], pins: Optional[List[Dict[str, Any]]] = None
           ) -> Any:
    rule: Dict[str, Any] = {"id": "r", "action": "require-signature", "match": {"go": True}}
    if pins is not None:
        rule["go"] = {"module_signers": pins}
    doc = {"version": 1, "trust": {"keys": [], "identities": identities}, "rules": [rule]}
    return parse_policy(json.dumps(doc).encode(), "p.json")


def test_policy_extensions_by_name_and_by_oid() -> None:
    snap = policy([{"issuer": ISSUER, "san": SAN,
                    "extensions": {"source_repository_uri": "https://github.com/acme/app",
                                   ARC + "20": "push"},
                    "extensions_regex": {"source_repository_ref": "refs/tags/v.*"}}])
    rule = snap.trust.identities[0]
    assert rule.extensions == ((REPO_URI, "https://github.com/acme/app"), (ARC + "20", "push"))
    assert rule.extensions_regex == ((REF, "refs/tags/v.*"),)
    plain = policy([{"issuer": ISSUER, "san": SAN}])
    assert plain.trust_digest != snap.trust_digest
    assert "extensions" not in plain.canonical  # older policies keep their digest


@pytest.mark.parametrize("ident,message", [
    ({"extensions": {"source_repo": "x"}}, "not a Fulcio extension"),
    ({"extensions": {ARC + "7": "x"}}, "not a Fulcio extension"),  # otherName SAN, no ext
    ({"extensions": {ARC + "08": "x"}}, "not a Fulcio extension"),
    ({"extensions": {"source_repository_uri": ""}}, "must not be empty"),
    ({"extensions": {"source_repository_uri": 1}}, "expected a string"),
    ({"extensions": ["x"]}, "expected a table"),
    ({"extensions_regex": {"source_repository_ref": "("}}, "bad regular expression"),
    ({"extensions": {"issuer": "a", ARC + "8": "a"}}, "same extension twice"),
    ({"extensions": {"source_repository_uri": "https://{module_repo}"}},
     "only filled in within go.module_signers"),
    ({"san": None, "san_regex": "https://{repo}/.*"}, "unknown placeholder {repo}"),
])
def test_policy_identity_errors(ident: Dict[str, Any], message: str) -> None:
    doc = {"issuer": ISSUER, "san": SAN, **ident}
    doc = {k: v for k, v in doc.items() if v is not None}
    with pytest.raises(MalformedInput) as err:
        policy([doc])
    assert message in str(err.value) and "trust.identities[0]" in str(err.value)


def test_module_signers_take_templates() -> None:
    pin = {"module": "github.com/acme/*", "identities": [
        {"issuer": ISSUER, "san_regex": r"https://{module_repo}/\.github/workflows/.*",
         "extensions": {"source_repository_uri": "https://{module_repo}"}}]}
    snap = policy([{"issuer": ISSUER, "san_regex": "https://github.com/acme/.*"}], [pin])
    bound = snap.rules[0].module_pins[0].signers
    assert bound.identities[0].templated
    with pytest.raises(MalformedInput, match=r"module_signers\[0\]\.identities\[0\]\.san"
                       r": unknown placeholder \{owner\}"):
        policy([], [dict(pin, identities=[{"issuer": ISSUER, "san": "{owner}"}])])


# -- evidence keeps its extensions through the trusted cache's file ---------------------------

def test_cache_file_round_trips_extensions() -> None:
    ev = Evidence(SignatureKind.BUNDLE_KEYLESS, "b", identity=SAN, issuer=ISSUER,
                  extensions=((REPO_URI, "https://github.com/acme/app"), (REF, "refs/tags/v1")))
    verdict = Verdict(True, Reason.OK, "ok", ev)
    ident = FileIdentity(1, 2, 3, 4)
    blob = encode("bind", [(ident, "ab" * 32, verdict, 5)])
    back = decode(blob).entries[0][2]
    assert back.evidence == ev
    assert ev.to_json()["extensions"] == dict(ev.extensions)
    assert "extensions" not in Evidence(SignatureKind.COSIGN_SIG, "s").to_json()


def test_trust_digest_covers_extension_requirements() -> None:
    a = TrustConfig(identities=(IdentityRule(ISSUER, san=SAN),))
    b = TrustConfig(identities=(IdentityRule(ISSUER, san=SAN, extensions=((REF, "x"),)),))
    c = TrustConfig(identities=(IdentityRule(ISSUER, san=SAN, extensions_regex=((REF, "x"),)),))
    assert len({trust_digest(a), trust_digest(b), trust_digest(c)}) == 3
