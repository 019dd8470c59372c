"""cosign legacy ``--bundle`` JSON. No cosign binary exists here, so the legacy documents are
converted from the npm client's v0.1/v0.2 bundles (``to_legacy``): the signature, SET, Rekor
body, integratedTime, logIndex and logID are the real client's output, only re-packed."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from agent.errors import Reason
from agent.verify.model import IdentityRule, SignatureKind
from tests.bundle_fixtures import (
    Generated,
    dumps,
    generated,
    to_legacy,
    to_legacy_keyed,
    verify_file,
)


@pytest.fixture(scope="module")
def gen() -> Generated:
    return generated()


@pytest.fixture(scope="module")
def legacy(gen: Generated) -> Any:
    return to_legacy(gen.doc("keyless-v0.1.json"))


def run(gen: Generated, doc: Any, **trust: Any) -> Any:
    return verify_file(gen.hello, dumps(doc), "hello.bundle", gen.trust(**trust))


def test_keyless_legacy_bundle_verifies(gen: Generated, legacy: Any) -> None:
    verdict = run(gen, legacy)
    assert verdict.trusted, verdict.detail
    ev = verdict.evidence
    assert ev.kind == SignatureKind.COSIGN_LEGACY_BUNDLE
    assert (ev.identity, ev.issuer) == (gen.identity, gen.issuer)
    assert ev.log_index == legacy["rekorBundle"]["Payload"]["logIndex"]
    assert ev.integrated_time == legacy["rekorBundle"]["Payload"]["integratedTime"]


def test_one_line_pem_in_body(gen: Generated) -> None:
    # compared as DER: the body's PEM text need not match any particular wrapping
    assert run(gen, to_legacy(gen.doc("keyless-v0.2-pem-oneline.json"))).trusted


def test_keyed_legacy_bundle(gen: Generated) -> None:
    doc = to_legacy_keyed(gen.doc("key-v0.2.json"), gen.read("managed.pub"))
    verdict = run(gen, doc)
    assert verdict.trusted, verdict.detail
    assert verdict.evidence.key_fingerprint.startswith("sha256:")
    assert run(gen, doc, keys=["stranger.pub"]).reason == Reason.UNTRUSTED_KEY
    # without rekorBundle a pinned key still stands on its own
    del doc["rekorBundle"]
    assert run(gen, doc).trusted


def test_identity_and_issuer_mismatch(gen: Generated, legacy: Any) -> None:
    rule = IdentityRule(issuer=gen.issuer, san="https://github.com/evil/x")
    assert run(gen, legacy, identities=[rule]).reason == Reason.IDENTITY_MISMATCH
    rule = IdentityRule(issuer="https://accounts.google.com", san=gen.identity)
    assert run(gen, legacy, identities=[rule]).reason == Reason.IDENTITY_MISMATCH
    rule = IdentityRule(issuer=gen.issuer, san_regex=r"https://github\.com/execguard/hello/.*")
    assert run(gen, legacy, identities=[rule]).trusted


def test_tampered_binary(gen: Generated, legacy: Any, tmp_path: Path) -> None:
    data = bytearray(gen.hello.read_bytes())
    data[100] ^= 0xFF
    (tmp_path / "hello").write_bytes(bytes(data))
    verdict = verify_file(tmp_path / "hello", dumps(legacy), "b", gen.trust())
    assert verdict.reason == Reason.DIGEST_MISMATCH, verdict.detail


def test_truncated_signature(gen: Generated, legacy: Any) -> None:
    sig = base64.b64decode(legacy["base64Signature"])
    doc = dict(legacy, base64Signature=base64.b64encode(sig[:-6]).decode())
    assert run(gen, doc).reason == Reason.BAD_SIGNATURE


def test_untrusted_root(gen: Generated, legacy: Any) -> None:
    verdict = run(gen, legacy, root="other_trusted_root.json")
    assert verdict.reason == Reason.UNTRUSTED_ROOT, verdict.detail


def test_expired_certificate(gen: Generated) -> None:
    doc = to_legacy(gen.doc("keyless-expired.json"))
    verdict = run(gen, doc, root="late_trusted_root.json")
    assert verdict.reason == Reason.CERTIFICATE_INVALID, verdict.detail


@pytest.mark.parametrize("field,value", [("integratedTime", 1), ("logIndex", 1)])
def test_set_covers_payload(gen: Generated, legacy: Any, field: str, value: int) -> None:
    doc = json.loads(json.dumps(legacy))
    doc["rekorBundle"]["Payload"][field] += value
    assert run(gen, doc).reason == Reason.TLOG_INVALID


def test_body_for_other_signature(gen: Generated, legacy: Any) -> None:
    """A valid SET over a body that records another signature must not vouch for this one."""
    other = to_legacy(gen.doc("keyless-v0.3.json"))  # another signing event, same artifact
    doc = dict(legacy, rekorBundle=other["rekorBundle"])
    verdict = run(gen, doc)
    assert not verdict.trusted
    assert verdict.reason == Reason.TLOG_INVALID, verdict.detail
    assert "different signature" in verdict.detail


def test_malformed(gen: Generated, legacy: Any) -> None:
    for doc in ({"base64Signature": "@@@", "cert": legacy["cert"]},
                dict(legacy, cert=base64.b64encode(b"not pem").decode()),
                dict(legacy, rekorBundle={"Payload": "x"}),
                {"base64Signature": "A" * 3_000_000}):
        verdict = run(gen, doc)
        assert verdict.reason == Reason.MALFORMED_SIGNATURE, verdict.detail
        assert verdict.detail.startswith("hello.bundle: ")
