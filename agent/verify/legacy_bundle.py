"""cosign's legacy ``--bundle`` JSON, and the Fulcio-certificate checks it shares with SET-only
v0.1 Sigstore bundles (which sigstore-python refuses: it insists on an inclusion proof).

Legacy format: ``base64Signature`` (raw signature over the blob), ``cert`` (base64 of a PEM
certificate chain, or of a PEM public key for keyed signing) and ``rekorBundle`` (SET plus the
payload it signs). There is no inclusion proof in this format: the SET is the log evidence.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Dict, Optional, Tuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.digest import Artifact
from agent.errors import MalformedInput, Reason
from agent.verify.bundle import MAX_CERT, MAX_SIGNATURE, BundleError
from agent.verify.fulcio_ext import fulcio_extensions
from agent.verify.keys import (
    describe_key,
    key_fingerprint,
    spki_der,
    verify_over_artifact,
    verify_prehashed,
)
from agent.verify.model import Evidence, IdentityRule, SignatureKind, TrustConfig, Verdict
from agent.verify.tlog import TlogEntry, TlogError, check_hashedrekord, verify_entry
from agent.verify.trusted_root import (
    CertError,
    b64decode,
    cached_trusted_root,
    cert_identity,
    verify_fulcio_cert,
)

_PEM = re.compile(r"-----BEGIN ([A-Z ]+)-----(.*?)-----END \1-----", re.S)


def _b64(value: Any, what: str, limit: int) -> bytes:
    if not isinstance(value, str) or not value:
        raise BundleError(f"{what} missing")
    if len(value) > limit * 4 // 3 + 8:
        raise BundleError(f"{what} is too large")
    try:
        return b64decode("".join(value.split()), what)
    except ValueError as exc:
        raise BundleError(str(exc)) from None


def match_identity(cert: x509.Certificate, rules: Tuple[IdentityRule, ...]
                   ) -> Tuple[Optional[str], Optional[str], Optional[IdentityRule]]:
    """(first SAN, issuer, the rule that matched or None); extension values count too."""
    sans, issuer = cert_identity(cert)
    extensions = dict(fulcio_extensions(cert))
    for rule in rules:
        for san in sans:
            if issuer is not None and rule.matches(san, issuer, extensions):
                return san, issuer, rule
    return (sans[0] if sans else None), issuer, None


def _parse_rekor_bundle(rb: Any) -> TlogEntry:
    if not isinstance(rb, dict) or not isinstance(rb.get("Payload"), dict):
        raise BundleError("rekorBundle.Payload missing")
    p = rb["Payload"]
    body_b64 = p.get("body")
    body = _b64(body_b64, "rekorBundle body", 64 << 10)
    try:
        kind = json.loads(body)
        log_id = bytes.fromhex(p["logID"])
        values = (p["integratedTime"], p["logIndex"])
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ValueError("integratedTime/logIndex are not integers")
        k, v = str(kind["kind"]), str(kind["apiVersion"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"rekorBundle payload malformed ({exc})") from None
    set_ = _b64(rb.get("SignedEntryTimestamp"), "rekorBundle SignedEntryTimestamp", 512)
    return TlogEntry(values[1], log_id, k, v, values[0], body, set_, None, body_b64)


def verify_legacy_bundle(artifact: Artifact, doc: Dict[str, Any], source: str,
                         trust: TrustConfig) -> Verdict:
    signature = _b64(doc.get("base64Signature"), "base64Signature", MAX_SIGNATURE)
    pem = _b64(doc.get("cert"), "cert", 4 * MAX_CERT).decode("ascii", "replace")
    blocks = [(label, "".join(body.split())) for label, body in _PEM.findall(pem)]
    if not blocks:
        raise BundleError("cert is not base64 of a PEM certificate or public key")
    entry = _parse_rekor_bundle(doc["rekorBundle"]) if doc.get("rekorBundle") else None
    claim = Evidence(SignatureKind.COSIGN_LEGACY_BUNDLE, source,
                     log_index=entry.log_index if entry else None)
    try:
        if blocks[0][0] == "CERTIFICATE":
            leaf = x509.load_der_x509_certificate(b64decode(blocks[0][1], "cert"))
            if entry is None:
                return Verdict.fail(Reason.TLOG_INVALID, f"{source}: keyless cosign bundle "
                                    "without rekorBundle: no verified signing time", claim)
            return verify_fulcio_signed(artifact, leaf, signature, entry, source, trust, claim)
        if blocks[0][0] == "PUBLIC KEY":
            key = serialization.load_der_public_key(b64decode(blocks[0][1], "cert"))
            return _verify_keyed(artifact, key, signature, entry, source, trust, claim)
    except ValueError as exc:
        raise BundleError(f"cert does not parse ({exc})") from None
    raise BundleError(f"cert holds a PEM {blocks[0][0]}, not a certificate or public key")


def _verify_keyed(artifact: Artifact, key: Any, signature: bytes, entry: Optional[TlogEntry],
                  source: str, trust: TrustConfig, claim: Evidence) -> Verdict:
    der = spki_der(key)
    trusted = next((k for k in trust.keys if spki_der(k.public_key) == der), None)
    if trusted is None:
        return Verdict.fail(Reason.UNTRUSTED_KEY if trust.keys else Reason.NO_TRUST_CONFIGURED,
                            f"{source}: signed by untrusted key {key_fingerprint(key)}", claim)
    evidence = replace(claim, key_fingerprint=trusted.fingerprint)
    ok, tried = verify_over_artifact(trusted.public_key, signature, artifact)
    if not ok:
        return Verdict.fail(Reason.BAD_SIGNATURE, f"{source}: signature does not verify with "
                            f"{describe_key(key)} key {trusted.source} ({tried})", evidence)
    if entry is None:
        return Verdict.ok(evidence, f"{source}: cosign bundle signed by {trusted.source}; "
                          "no transparency log entry")
    try:
        root = _root(trust)
        verify_entry(entry, root, require_proof=False)
        check_hashedrekord(entry, artifact.sha256, signature, der)
    except TlogError as exc:
        return Verdict.fail(Reason.TLOG_INVALID, f"{source}: {exc}", evidence)
    except MalformedInput as exc:
        return Verdict.fail(Reason.NO_TRUST_CONFIGURED, str(exc), evidence)
    return Verdict.ok(replace(evidence, integrated_time=entry.integrated_time),
                      f"{source}: cosign bundle signed by {trusted.source}, Rekor index "
                      f"{entry.log_index}")


def _root(trust: TrustConfig) -> Any:
    if trust.trusted_root is None:
        raise MalformedInput(source_of(trust), "no trusted_root.json configured")
    return cached_trusted_root(trust.trusted_root, source_of(trust))


def source_of(trust: TrustConfig) -> str:
    return trust.trusted_root_source or "trusted_root.json"


def verify_fulcio_signed(artifact: Artifact, leaf: x509.Certificate, signature: bytes,
                         entry: TlogEntry, source: str, trust: TrustConfig,
                         claim: Evidence, require_proof: bool = False) -> Verdict:
    """Keyless with a SET: chain at the (claimed, then SET-verified) integrated time, identity,
    digest, signature, SET, and body consistency, in that order so the reason is precise."""
    if trust.trusted_root is None or not trust.identities:
        return Verdict.fail(Reason.NO_TRUST_CONFIGURED, f"{source}: keyless signature needs a "
                            "trusted root and at least one trusted identity", claim)
    try:
        root = _root(trust)
    except MalformedInput as exc:
        return Verdict.fail(Reason.NO_TRUST_CONFIGURED, str(exc), claim)
    san, issuer, rule = match_identity(leaf, trust.identities)
    evidence = replace(claim, identity=san, issuer=issuer, integrated_time=entry.integrated_time,
                       extensions=fulcio_extensions(leaf))
    when = datetime.fromtimestamp(entry.integrated_time, tz=timezone.utc)
    try:
        verify_fulcio_cert(leaf, when, root)
    except CertError as exc:
        reason = Reason.UNTRUSTED_ROOT if exc.untrusted else Reason.CERTIFICATE_INVALID
        return Verdict.fail(reason, f"{source}: {exc}", evidence)
    if rule is None:
        return Verdict.fail(Reason.IDENTITY_MISMATCH, f"{source}: signer {san} from {issuer} "
                            "matches no trusted identity", evidence)
    if entry.kind != "hashedrekord":
        return Verdict.fail(Reason.UNSUPPORTED_SIGNATURE,
                            f"{source}: log entry kind {entry.kind} is not hashedrekord", evidence)
    try:
        check_hashedrekord(entry, artifact.sha256, signature, leaf.public_bytes(
            serialization.Encoding.DER))
    except TlogError as exc:
        if "digest" in str(exc):
            return Verdict.fail(Reason.DIGEST_MISMATCH, f"{source}: {exc}", evidence)
        body_problem: Optional[TlogError] = exc
    else:
        body_problem = None
    key = leaf.public_key()
    try:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise InvalidSignature(f"{describe_key(key)} leaf keys are not supported")
        verify_prehashed(key, signature, artifact.sha256, "sha256")
    except InvalidSignature:
        return Verdict.fail(Reason.BAD_SIGNATURE, f"{source}: signature does not verify with "
                            "the certificate's key", evidence)
    try:
        if verify_entry(entry, root, require_proof) is None:
            raise TlogError("no SET: the signing time is not verified")
        if body_problem is not None:
            raise body_problem
    except TlogError as exc:
        return Verdict.fail(Reason.TLOG_INVALID, f"{source}: {exc}", evidence)
    return Verdict.ok(evidence, f"{source}: signed by {san} from {issuer} "
                      f"(rule {rule.describe()}), Rekor index {entry.log_index}")

