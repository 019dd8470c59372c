"""Bundle shape checks, malformed inputs, build_key_bundle round trips, trusted root parsing.
No npm here: keys and bundles are made in Python."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any, Dict

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from agent.digest import Artifact
from agent.errors import MalformedInput, Reason
from agent.verify.bundle import build_key_bundle, verify_bundle
from agent.verify.keys import parse_public_key
from agent.verify.model import IdentityRule, TrustConfig
from agent.verify.trusted_root import parse_time, parse_trusted_root

V01 = "application/vnd.dev.sigstore.bundle+json;version=0.1"


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    blob = tmp_path / "app"
    blob.write_bytes(b"\x7fELF not really" * 1000)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha256(blob.read_bytes()).digest()
    sig = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    trust = TrustConfig(keys=(parse_public_key(pem, "k.pub"),),
                        identities=(IdentityRule(issuer="https://i", san="a@b"),))
    return blob, key, digest, sig, trust


def run(blob: Path, data: bytes, trust: TrustConfig) -> Any:
    with Artifact.open(str(blob)) as art:
        return verify_bundle(art, data, "app.sigstore.json", trust)


def test_build_key_bundle_round_trip(setup: Any) -> None:
    blob, key, digest, sig, trust = setup
    data = build_key_bundle(digest, sig, key.public_key())
    doc = json.loads(data)
    assert doc["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert doc["verificationMaterial"]["tlogEntries"] == []
    verdict = run(blob, data, trust)
    assert verdict.trusted, verdict.detail
    assert verdict.evidence.key_fingerprint == trust.keys[0].fingerprint
    # any accepted media type, same content
    for mt in (V01, V01.replace("0.1", "0.2"), V01.replace("0.1", "0.3")):
        assert run(blob, json.dumps(dict(doc, mediaType=mt)).encode(), trust).trusted
    other = ec.generate_private_key(ec.SECP256R1())
    stranger = build_key_bundle(digest, other.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))),
                                other.public_key())
    assert run(blob, stranger, trust).reason == Reason.UNTRUSTED_KEY
    wrong_digest = build_key_bundle(b"\x00" * 32, sig, key.public_key())
    assert run(blob, wrong_digest, trust).reason == Reason.DIGEST_MISMATCH
    assert run(blob, build_key_bundle(digest, sig[:-4], key.public_key()),
               trust).reason == Reason.BAD_SIGNATURE


def _base(setup: Any) -> Dict[str, Any]:
    _, key, digest, sig, _ = setup
    return dict(json.loads(build_key_bundle(digest, sig, key.public_key())))


@pytest.mark.parametrize("mutate", [
    lambda d: b"not json {",
    lambda d: b"[1, 2]",
    lambda d: b"\xff\xfe",
    lambda d: dict(d, mediaType="application/vnd.dev.sigstore.bundle+json;version=9.9"),
    lambda d: dict(d, mediaType=3),
    lambda d: {k: v for k, v in d.items() if k != "verificationMaterial"},
    lambda d: {k: v for k, v in d.items() if k != "messageSignature"},
    lambda d: dict(d, dsseEnvelope={"payload": "", "payloadType": "x", "signatures": []}),
    lambda d: dict(d, verificationMaterial={"tlogEntries": []}),
    lambda d: dict(d, verificationMaterial={"publicKey": {"hint": ""}}),
    lambda d: dict(d, verificationMaterial=dict(d["verificationMaterial"],
                                                certificate={"rawBytes": "AAAA"})),
    lambda d: dict(d, messageSignature={"signature": "%%%"}),
    lambda d: dict(d, messageSignature={"signature": "A" * 10_000}),
    lambda d: dict(d, messageSignature=dict(d["messageSignature"],
                                            messageDigest={"algorithm": "MD5", "digest": "AA=="})),
    lambda d: dict(d, verificationMaterial=dict(d["verificationMaterial"],
                                                tlogEntries=[{"logIndex": "x"}])),
    lambda d: dict(d, verificationMaterial=dict(d["verificationMaterial"],
                                                tlogEntries=[{}] * 20)),
    lambda d: dict(d, huge="A" * (2 << 20)),
    lambda d: {"something": "else"},
])
def test_malformed_is_reported_never_raised(setup: Any, mutate: Any) -> None:
    blob, *_, trust = setup
    out = mutate(_base(setup))
    data = out if isinstance(out, bytes) else json.dumps(out).encode()
    verdict = run(blob, data, trust)
    assert verdict.reason == Reason.MALFORMED_SIGNATURE, verdict.detail
    assert verdict.detail.startswith("app.sigstore.json: ")
    assert not verdict.trusted


def test_keyless_chain_vs_certificate_by_version(setup: Any) -> None:
    blob, *_, trust = setup
    cert = {"rawBytes": base64.b64encode(b"0" * 40).decode()}
    doc = dict(_base(setup), verificationMaterial={"x509CertificateChain": {
        "certificates": [cert]}})
    v03 = run(blob, json.dumps(doc).encode(), trust)
    assert v03.reason == Reason.MALFORMED_SIGNATURE and "single certificate" in v03.detail
    doc = dict(doc, mediaType=V01, verificationMaterial={"certificate": cert})
    v01 = run(blob, json.dumps(doc).encode(), trust)
    assert v01.reason == Reason.MALFORMED_SIGNATURE and "x509CertificateChain" in v01.detail


def test_trusted_root_parsing() -> None:
    spki = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    tlog = {"publicKey": {"rawBytes": base64.b64encode(spki).decode()},
            "logId": {"keyId": base64.b64encode(hashlib.sha256(spki).digest()).decode()}}
    with pytest.raises(MalformedInput, match=r"validFor\.start"):
        parse_trusted_root(json.dumps({
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "tlogs": [tlog]}).encode(), "r")
    with pytest.raises(MalformedInput, match="no certificate"):
        parse_trusted_root(json.dumps({
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "certificateAuthorities": [{"certChain": {"certificates": []}}]}).encode(), "r")
    with pytest.raises(MalformedInput, match="mediaType"):
        parse_trusted_root(b'{"mediaType": "x"}', "r")
    with pytest.raises(MalformedInput):
        parse_trusted_root(b"nope", "r")
    empty = parse_trusted_root(
        b'{"mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1"}', "r")
    assert empty.tlogs == {} and empty.fulcio == ()
    assert parse_time("2021-10-07T13:56:59.123456789Z", "t").microsecond == 123456
    assert parse_time("2025-09-23T00:00:00Z", "t").year == 2025
