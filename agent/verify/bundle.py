"""Sigstore bundles (v0.1-v0.3) and cosign legacy ``--bundle`` JSON: parse, check shape, dispatch.

Keyless bundles go to ``keyless`` (sigstore-python), managed-key bundles to ``keyed_bundle``,
cosign's legacy JSON to ``legacy_bundle``. ``verify_bundle`` never raises: every problem is a
Verdict naming the bundle file. Formats are described in docs/signatures.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from agent.digest import Artifact
from agent.errors import InputError, Reason
from agent.verify.keys import key_hint
from agent.verify.model import Evidence, SignatureKind, TrustConfig, Verdict
from agent.verify.tlog import TlogEntry, parse_bundle_entry
from agent.verify.trusted_root import b64decode

MEDIA_TYPES = {
    "application/vnd.dev.sigstore.bundle+json;version=0.1": "0.1",
    "application/vnd.dev.sigstore.bundle+json;version=0.2": "0.2",
    "application/vnd.dev.sigstore.bundle+json;version=0.3": "0.3",
    "application/vnd.dev.sigstore.bundle.v0.3+json": "0.3",
}
MEDIA_TYPE_V03 = "application/vnd.dev.sigstore.bundle.v0.3+json"
MAX_BUNDLE_SIZE = 1 << 20  # real bundles are a few KiB; refuse to parse megabytes of base64
MAX_SIGNATURE = 2048  # RSA-4096 is 512 bytes
MAX_CERT = 16 << 10
MAX_TLOG_ENTRIES = 8
# proto3 JSON enums may appear by name or by number.
HASHES = {"SHA2_256": "sha256", "SHA2_384": "sha384", "SHA2_512": "sha512",
          1: "sha256", 2: "sha384", 3: "sha512"}


class BundleError(Exception):
    """A bundle that is not even well-formed: becomes ``malformed-signature``."""


@dataclass(frozen=True)
class ParsedBundle:
    """The parts of a protobuf bundle the verifiers need, checked for shape."""

    media_type: str
    version: str  # "0.1" | "0.2" | "0.3"
    key_hint: Optional[str]  # managed key
    certs: Tuple[bytes, ...]  # keyless: DER, leaf first
    tlog_entries: Tuple[TlogEntry, ...]
    hash_name: str  # of the message digest
    message_digest: Optional[bytes]
    signature: bytes
    is_dsse: bool
    has_timestamps: bool


def verify_bundle(artifact: Artifact, data: bytes, source: str, trust: TrustConfig) -> Verdict:
    """Verify ``data`` (a bundle file's bytes) for ``artifact`` under ``trust``. Never raises."""
    try:
        doc = _load(data)
        if "mediaType" in doc:
            parsed = parse_bundle(doc)
            return _dispatch(artifact, parsed, doc, source, trust)
        if "base64Signature" in doc or "rekorBundle" in doc:
            from agent.verify.legacy_bundle import verify_legacy_bundle

            return verify_legacy_bundle(artifact, doc, source, trust)
        raise BundleError("neither a Sigstore bundle (mediaType) nor a cosign bundle "
                          "(base64Signature)")
    except BundleError as exc:
        return Verdict.fail(Reason.MALFORMED_SIGNATURE, f"{source}: {exc}")
    except InputError as exc:
        return Verdict.fail(Reason.BAD_SIGNATURE, f"{source}: cannot check {exc}")
    except Exception as exc:  # the agent denies on any surprise rather than crash
        return Verdict.fail(Reason.BAD_SIGNATURE,
                            f"{source}: verification failed ({type(exc).__name__}: {exc})")


def _load(data: bytes) -> Dict[str, Any]:
    if len(data) > MAX_BUNDLE_SIZE:
        raise BundleError(f"bundle is {len(data)} bytes, over the {MAX_BUNDLE_SIZE}-byte limit")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise BundleError("not a JSON object")
    return doc


def _b64(value: Any, what: str, limit: int) -> bytes:
    if not isinstance(value, str) or not value:
        raise BundleError(f"{what} missing")
    if len(value) > limit * 4 // 3 + 4:
        raise BundleError(f"{what} is too large")
    try:
        return b64decode(value, what)
    except ValueError as exc:
        raise BundleError(str(exc)) from None


def parse_bundle(doc: Dict[str, Any]) -> ParsedBundle:
    media_type = doc.get("mediaType")
    version = MEDIA_TYPES.get(media_type) if isinstance(media_type, str) else None
    if version is None or not isinstance(media_type, str):
        raise BundleError(f"unsupported bundle mediaType {media_type!r}")
    vm = doc.get("verificationMaterial")
    if not isinstance(vm, dict):
        raise BundleError("verificationMaterial missing")
    present = [k for k in ("publicKey", "x509CertificateChain", "certificate") if k in vm]
    if len(present) != 1:
        raise BundleError("verificationMaterial needs exactly one of publicKey, "
                          "x509CertificateChain, certificate")
    hint, certs = None, ()  # type: Optional[str], Tuple[bytes, ...]
    if present[0] == "publicKey":
        hint = (vm["publicKey"] or {}).get("hint")
        if not isinstance(hint, str) or not hint:
            raise BundleError("publicKey.hint missing")
    elif present[0] == "certificate":
        if version != "0.3":
            raise BundleError(f"a v{version} bundle carries x509CertificateChain, not certificate")
        certs = (_b64((vm["certificate"] or {}).get("rawBytes"), "certificate", MAX_CERT),)
    else:
        if version == "0.3":
            raise BundleError("a v0.3 bundle carries a single certificate, not a chain")
        raw = (vm["x509CertificateChain"] or {}).get("certificates")
        if not isinstance(raw, list) or not raw or len(raw) > 4:
            raise BundleError("x509CertificateChain.certificates must list 1-4 certificates")
        certs = tuple(_b64((c or {}).get("rawBytes"), "certificate", MAX_CERT) for c in raw)
    entries = vm.get("tlogEntries") or []
    if not isinstance(entries, list) or len(entries) > MAX_TLOG_ENTRIES:
        raise BundleError("tlogEntries must be a short list")
    try:
        tlog = tuple(parse_bundle_entry(e) for e in entries)
    except ValueError as exc:
        raise BundleError(f"bad tlog entry: {exc}") from None
    tsa = (vm.get("timestampVerificationData") or {}).get("rfc3161Timestamps") or []
    if ("messageSignature" in doc) == ("dsseEnvelope" in doc):
        raise BundleError("needs exactly one of messageSignature, dsseEnvelope")
    if "dsseEnvelope" in doc:
        return ParsedBundle(media_type, version, hint, certs, tlog, "sha256", None, b"", True,
                            bool(tsa))
    ms = doc["messageSignature"]
    if not isinstance(ms, dict):
        raise BundleError("messageSignature is not an object")
    signature = _b64(ms.get("signature"), "messageSignature.signature", MAX_SIGNATURE)
    md, hash_name = ms.get("messageDigest"), "sha256"
    digest = None
    if md is not None:
        if not isinstance(md, dict) or md.get("algorithm") not in HASHES:
            raise BundleError("messageDigest.algorithm is not SHA2_256/384/512")
        hash_name = HASHES[md["algorithm"]]
        digest = _b64(md.get("digest"), "messageDigest.digest", 64)
    return ParsedBundle(media_type, version, hint, certs, tlog, hash_name, digest, signature,
                        False, bool(tsa))


def _dispatch(artifact: Artifact, parsed: ParsedBundle, doc: Dict[str, Any], source: str,
              trust: TrustConfig) -> Verdict:
    keyed = parsed.key_hint is not None
    kind = SignatureKind.BUNDLE_KEY if keyed else SignatureKind.BUNDLE_KEYLESS
    claim = Evidence(kind, source, bundle_media_type=parsed.media_type,
                     log_index=parsed.tlog_entries[0].log_index if parsed.tlog_entries else None)
    if parsed.is_dsse:
        # An attestation (in-toto statement), not a signature over the file: not accepted
        # as permission to execute.
        return Verdict.fail(Reason.UNSUPPORTED_SIGNATURE, f"{source}: DSSE envelope bundles "
                            "(attestations) are not supported; sign the binary itself", claim)
    if parsed.message_digest is not None and parsed.message_digest != artifact.digest(
            parsed.hash_name):
        return Verdict.fail(Reason.DIGEST_MISMATCH,
                            f"{source}: bundle is for another file ({parsed.hash_name} "
                            f"{parsed.message_digest.hex()}, file has "
                            f"{artifact.digest(parsed.hash_name).hex()})", claim)
    if keyed:
        from agent.verify.keyed_bundle import verify_key_bundle

        return verify_key_bundle(artifact, parsed, source, trust, claim)
    try:
        from agent.verify.keyless import verify_keyless
    except ImportError:  # sigstore-python needs Python >= 3.10: fall back to our own checks
        return _keyless_fallback(artifact, parsed, source, trust, claim)
    return verify_keyless(artifact, parsed, doc, source, trust, claim)


def _keyless_fallback(artifact: Artifact, parsed: ParsedBundle, source: str,
                      trust: TrustConfig, claim: Evidence) -> Verdict:
    """Without sigstore-python: one Rekor v1 entry with a SET (plus proof from v0.2 on)."""
    from cryptography import x509

    from agent.verify.legacy_bundle import verify_fulcio_signed

    if len(parsed.tlog_entries) != 1 or parsed.hash_name != "sha256":
        return Verdict.fail(Reason.UNSUPPORTED_SIGNATURE, f"{source}: sigstore-python is not "
                            "installed; only single-entry SHA-256 keyless bundles are checked "
                            "without it", claim)
    try:
        leaf = x509.load_der_x509_certificate(parsed.certs[0])
    except ValueError as exc:
        raise BundleError(f"certificate: {exc}") from None
    return verify_fulcio_signed(artifact, leaf, parsed.signature, parsed.tlog_entries[0],
                                source, trust, claim, require_proof=parsed.version != "0.1")


def build_key_bundle(digest: bytes, signature: bytes, public_key: Any,
                     hash_name: str = "sha256") -> bytes:
    """A v0.3 managed-key bundle: key hint, message digest, no tlog entries.

    ``hash_name`` is the hash the signature was made over (the key's registry hash), so
    a P-384 key's bundle says SHA2_384; Ed25519 signs the message itself, and its digest
    is informational.
    """
    algorithm = next((name for name, h in HASHES.items() if h == hash_name), None)
    if algorithm is None or len(digest) != hashlib.new(hash_name).digest_size:
        raise ValueError(f"digest is not a {hash_name} digest")
    doc = {
        "mediaType": MEDIA_TYPE_V03,
        "verificationMaterial": {"publicKey": {"hint": key_hint(public_key)},
                                 "tlogEntries": []},
        "messageSignature": {
            "messageDigest": {"algorithm": algorithm,
                              "digest": base64.b64encode(digest).decode()},
            "signature": base64.b64encode(signature).decode(),
        },
    }
    return (json.dumps(doc, indent=2) + "\n").encode()
