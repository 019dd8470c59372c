"""Bundles produced by the real npm sigstore client (offline, mock Fulcio/CT/Rekor), verified by
execguard: every positive case, and each negative control failing for its own reason."""

from __future__ import annotations

import base64
import sys
from typing import Any, Dict

import pytest

from agent.digest import Artifact
from agent.errors import Reason
from agent.verify.bundle import verify_bundle
from agent.verify.model import IdentityRule, SignatureKind
from agent.verify.tlog import parse_bundle_entry, verify_entry
from agent.verify.trusted_root import parse_trusted_root
from tests.bundle_fixtures import DELETE, Generated, dumps, edited, generated, verify_file

KEYLESS = ["keyless-v0.1.json", "keyless-v0.1-set-only.json", "keyless-v0.2.json",
           "keyless-v0.2-pem-oneline.json", "keyless-v0.3.json"]


@pytest.fixture(scope="module")
def gen() -> Generated:
    return generated()


@pytest.fixture
def tampered(gen: Generated, tmp_path: Any) -> Any:
    data = bytearray(gen.hello.read_bytes())
    data[len(data) // 2] ^= 0x01
    path = tmp_path / "hello"
    path.write_bytes(bytes(data))
    return path


def check(gen: Generated, name: str, reason: Reason, **trust: Any) -> str:
    verdict = verify_file(gen.hello, gen.read(name), name, gen.trust(**trust))
    assert verdict.reason == reason, verdict.detail
    assert verdict.trusted == (reason == Reason.OK)
    assert name in verdict.detail
    return verdict.detail


@pytest.mark.parametrize("name", KEYLESS)
def test_keyless_bundles_verify(gen: Generated, name: str) -> None:
    doc = gen.doc(name)
    verdict = verify_file(gen.hello, gen.read(name), name, gen.trust())
    assert verdict.trusted, verdict.detail
    ev = verdict.evidence
    assert ev is not None and ev.kind == SignatureKind.BUNDLE_KEYLESS
    assert (ev.identity, ev.issuer) == (gen.identity, gen.issuer)
    entry = doc["verificationMaterial"]["tlogEntries"][0]
    assert ev.log_index == int(entry["logIndex"])
    assert ev.integrated_time == int(entry["integratedTime"])
    assert ev.bundle_media_type == doc["mediaType"]


def test_media_types_cover_all_versions(gen: Generated) -> None:
    types = {gen.doc(n)["mediaType"] for n in KEYLESS}
    assert types == {"application/vnd.dev.sigstore.bundle+json;version=0.1",
                     "application/vnd.dev.sigstore.bundle+json;version=0.2",
                     "application/vnd.dev.sigstore.bundle.v0.3+json"}
    # the v0.3 media type spelled the older way is accepted too
    doc = edited(gen.doc("keyless-v0.3.json"),
                 mediaType="application/vnd.dev.sigstore.bundle+json;version=0.3")
    assert verify_file(gen.hello, dumps(doc), "v03-old-name", gen.trust()).trusted


def test_regex_identity(gen: Generated) -> None:
    good = IdentityRule(issuer=gen.issuer,
                        san_regex=r"https://github\.com/execguard/.*@refs/tags/v.*")
    bad = IdentityRule(issuer=gen.issuer, san_regex=r"https://github\.com/someone-else/.*")
    for name in ("keyless-v0.2.json", "keyless-v0.1-set-only.json"):
        trust = gen.trust(identities=[bad, good])
        assert verify_file(gen.hello, gen.read(name), name, trust).trusted
        check(gen, name, Reason.IDENTITY_MISMATCH, identities=[bad])


@pytest.mark.parametrize("name", ["keyless-v0.2.json", "keyless-v0.3.json",
                                  "keyless-v0.1-set-only.json"])
def test_wrong_identity_and_issuer(gen: Generated, name: str) -> None:
    check(gen, name, Reason.IDENTITY_MISMATCH,
          identities=[IdentityRule(issuer=gen.issuer, san=gen.identity + "x")])
    detail = check(gen, name, Reason.IDENTITY_MISMATCH,
                   identities=[IdentityRule(issuer="https://accounts.google.com",
                                            san=gen.identity)])
    assert gen.issuer in detail


@pytest.mark.parametrize("name", ["keyless-v0.2.json", "keyless-v0.3.json",
                                  "keyless-v0.1-set-only.json", "key-v0.2.json"])
def test_tampered_binary(gen: Generated, tampered: Any, name: str) -> None:
    verdict = verify_file(tampered, gen.read(name), name, gen.trust())
    assert verdict.reason == Reason.DIGEST_MISMATCH, verdict.detail


def test_bundle_for_another_artifact(gen: Generated) -> None:
    detail = check(gen, "keyless-other-artifact.json", Reason.DIGEST_MISMATCH)
    with Artifact.open(str(gen.other)) as art:
        assert art.sha256.hex() in detail
        assert verify_bundle(art, gen.read("keyless-other-artifact.json"), "o",
                             gen.trust()).trusted


@pytest.mark.parametrize("name", ["keyless-v0.2.json", "keyless-v0.3.json",
                                  "keyless-v0.1-set-only.json", "key-v0.2.json",
                                  "key-notlog-v0.2.json"])
def test_truncated_signature(gen: Generated, name: str) -> None:
    doc = gen.doc(name)
    sig = base64.b64decode(doc["messageSignature"]["signature"])
    doc = edited(doc, messageSignature__signature=base64.b64encode(sig[:-8]).decode())
    verdict = verify_file(gen.hello, dumps(doc), name, gen.trust())
    assert verdict.reason == Reason.BAD_SIGNATURE, verdict.detail


@pytest.mark.parametrize("name", ["keyless-v0.2.json", "keyless-v0.3.json",
                                  "keyless-v0.1-set-only.json"])
def test_untrusted_root(gen: Generated, name: str) -> None:
    check(gen, name, Reason.UNTRUSTED_ROOT, root="other_trusted_root.json")


def test_certificate_expired_at_signing(gen: Generated) -> None:
    """keyless-expired.json is genuine client output: the mock Rekor integrated the entry 20
    minutes after the 10-minute certificate was issued. Its SET and proof are valid."""
    root = parse_trusted_root(gen.read("late_trusted_root.json"), "late")
    entry = parse_bundle_entry(gen.doc("keyless-expired.json")["verificationMaterial"]
                               ["tlogEntries"][0])
    assert verify_entry(entry, root, require_proof=True) is not None
    detail = check(gen, "keyless-expired.json", Reason.CERTIFICATE_INVALID,
                   root="late_trusted_root.json")
    assert "not valid" in detail
    # the same bundle as SET-only v0.1 goes through our own chain code: same answer
    doc = gen.doc("keyless-expired.json")
    del doc["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]
    doc["mediaType"] = "application/vnd.dev.sigstore.bundle+json;version=0.1"
    verdict = verify_file(gen.hello, dumps(doc), "expired-v01", gen.trust(
        root="late_trusted_root.json"))
    assert verdict.reason == Reason.CERTIFICATE_INVALID, verdict.detail


def test_dsse_bundle_is_unsupported(gen: Generated) -> None:
    check(gen, "keyless-dsse-v0.3.json", Reason.UNSUPPORTED_SIGNATURE)


@pytest.mark.parametrize("edit", ["set", "integrated_time", "proof_root", "checkpoint"])
def test_tlog_tampering(gen: Generated, edit: str) -> None:
    for name in ("keyless-v0.2.json", "key-v0.2.json"):
        doc = gen.doc(name)
        entry: Dict[str, Any] = doc["verificationMaterial"]["tlogEntries"][0]
        if edit == "set":
            sig = bytearray(base64.b64decode(entry["inclusionPromise"]["signedEntryTimestamp"]))
            sig[-3] ^= 1
            entry["inclusionPromise"]["signedEntryTimestamp"] = base64.b64encode(sig).decode()
        elif edit == "integrated_time":
            entry["integratedTime"] = str(int(entry["integratedTime"]) + 1)
        elif edit == "proof_root":
            entry["inclusionProof"]["rootHash"] = base64.b64encode(b"\x00" * 32).decode()
        else:
            note = entry["inclusionProof"]["checkpoint"]["envelope"]
            entry["inclusionProof"]["checkpoint"]["envelope"] = note.replace("\n\n", "\nx\n\n")
        verdict = verify_file(gen.hello, dumps(doc), name, gen.trust())
        assert verdict.reason == Reason.TLOG_INVALID, (name, verdict.detail)


def test_v02_requires_inclusion_proof(gen: Generated) -> None:
    for name in ("keyless-v0.2.json", "key-v0.2.json"):
        doc = edited(gen.doc(name), verificationMaterial__tlogEntries__0__inclusionProof=DELETE)
        verdict = verify_file(gen.hello, dumps(doc), name, gen.trust())
        assert not verdict.trusted
        assert verdict.reason in (Reason.TLOG_INVALID, Reason.MALFORMED_SIGNATURE), verdict.detail


def test_managed_key_bundles(gen: Generated) -> None:
    for name in ("key-v0.2.json", "key-notlog-v0.2.json"):
        verdict = verify_file(gen.hello, gen.read(name), name, gen.trust())
        assert verdict.trusted, verdict.detail
        ev = verdict.evidence
        assert ev is not None and ev.kind == SignatureKind.BUNDLE_KEY
        assert ev.key_fingerprint and ev.key_fingerprint.startswith("sha256:")
    ev = verify_file(gen.hello, gen.read("key-v0.2.json"), "k", gen.trust()).evidence
    entry = gen.doc("key-v0.2.json")["verificationMaterial"]["tlogEntries"][0]
    assert ev is not None and ev.integrated_time == int(entry["integratedTime"])


def test_wrong_key(gen: Generated) -> None:
    check(gen, "key-stranger-v0.2.json", Reason.UNTRUSTED_KEY)
    check(gen, "key-notlog-v0.2.json", Reason.UNTRUSTED_KEY, keys=["stranger.pub"])
    # the trusted key's hint on the stranger's signature
    doc = edited(gen.doc("key-stranger-v0.2.json"), verificationMaterial__publicKey__hint=gen.doc(
        "key-notlog-v0.2.json")["verificationMaterial"]["publicKey"]["hint"])
    assert verify_file(gen.hello, dumps(doc), "x", gen.trust()).reason == Reason.BAD_SIGNATURE


def test_managed_key_log_from_untrusted_root(gen: Generated) -> None:
    detail = check(gen, "key-v0.2.json", Reason.TLOG_INVALID, root="other_trusted_root.json")
    assert "unknown transparency log" in detail


def test_no_trust_configured(gen: Generated) -> None:
    check(gen, "keyless-v0.2.json", Reason.NO_TRUST_CONFIGURED, identities=[])
    check(gen, "key-notlog-v0.2.json", Reason.NO_TRUST_CONFIGURED, keys=[])


@pytest.mark.parametrize("name", KEYLESS)
def test_fallback_without_sigstore_python(gen: Generated, name: str, monkeypatch: Any) -> None:
    """Python 3.9 hosts cannot install sigstore-python 4.x: our own checks take over."""
    monkeypatch.setitem(sys.modules, "agent.verify.keyless", None)  # import now fails
    verdict = verify_file(gen.hello, gen.read(name), name, gen.trust())
    assert verdict.trusted, verdict.detail
    check(gen, name, Reason.UNTRUSTED_ROOT, root="other_trusted_root.json")
    check(gen, name, Reason.IDENTITY_MISMATCH,
          identities=[IdentityRule(issuer=gen.issuer, san="x")])
    expired = gen.read("keyless-expired.json")
    verdict = verify_file(gen.hello, expired, "e", gen.trust(root="late_trusted_root.json"))
    assert verdict.reason == Reason.CERTIFICATE_INVALID
