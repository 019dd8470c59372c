"""Keyless (Fulcio certificate) bundles through sigstore-python, against the pinned trusted root.

This is the only module that imports ``sigstore``. What we change before handing JSON over is
representation only: proto3 JSON may omit default values (``inclusionProof.logIndex: 0``,
``hashes: []``, a CA ``subject`` without ``commonName``), which sigstore-models rejects, so the
defaults are written back. sigstore-python insists on an inclusion proof; SET-only v0.1 bundles
(valid per the spec) are verified by our own code in ``legacy_bundle`` instead.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Dict, Tuple

from cryptography import x509
from sigstore.errors import VerificationError
from sigstore.hashes import Hashed
from sigstore.models import Bundle, InvalidBundle, TrustedRoot
from sigstore.verify import Verifier
from sigstore_models.common.v1 import HashAlgorithm
from sigstore_models.trustroot import v1 as trustroot_v1

from agent.digest import Artifact
from agent.errors import Reason
from agent.verify.bundle import ParsedBundle
from agent.verify.fulcio_ext import fulcio_extensions
from agent.verify.legacy_bundle import match_identity, verify_fulcio_signed
from agent.verify.model import Evidence, IdentityRule, TrustConfig, Verdict
from agent.verify.tlog import TlogEntry, TlogError, check_hashedrekord


class IdentityError(VerificationError):
    """Raised by our policy so the caller can tell an identity mismatch from the rest."""


class IdentityPolicy:
    """sigstore ``VerificationPolicy``: the certificate must match one of the host's rules
    (issuer exact; SAN exact or regex; Fulcio extension values exact or regex). SAN, issuer
    and extensions are read by our own code, which also decodes the Sigstore otherName SAN
    correctly."""

    def __init__(self, rules: Tuple[IdentityRule, ...]) -> None:
        self.rules = rules

    def verify(self, cert: x509.Certificate) -> None:
        san, issuer, rule = match_identity(cert, self.rules)
        if rule is None:
            raise IdentityError(f"signer {san} from {issuer} matches no trusted identity")


def _defaults(obj: Dict[str, Any], **values: Any) -> None:
    for name, value in values.items():
        if obj.get(name) is None:
            obj[name] = value


def normalize_bundle(doc: Dict[str, Any]) -> Dict[str, Any]:
    """Write back the proto3 defaults that sigstore-models requires explicitly."""
    out = copy.deepcopy(doc)
    vm = out.setdefault("verificationMaterial", {})
    _defaults(vm, tlogEntries=[])
    for entry in vm["tlogEntries"]:
        _defaults(entry, logIndex="0")
        proof = entry.get("inclusionProof")
        if isinstance(proof, dict):
            _defaults(proof, logIndex="0", treeSize="0", hashes=[])
    tvd = vm.get("timestampVerificationData")
    if isinstance(tvd, dict):
        _defaults(tvd, rfc3161Timestamps=[])
    return out


def normalize_root(doc: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(doc)
    _defaults(out, tlogs=[], certificateAuthorities=[], ctlogs=[], timestampAuthorities=[])
    for ca in out["certificateAuthorities"] + out["timestampAuthorities"]:
        if isinstance(ca, dict):
            _defaults(ca, subject={})
            _defaults(ca["subject"], organization="", commonName="")
    return out


@functools.lru_cache(maxsize=4)
def _verifier(root_bytes: bytes) -> Verifier:
    raw = json.dumps(normalize_root(json.loads(root_bytes))).encode()
    return Verifier(trusted_root=TrustedRoot(trustroot_v1.TrustedRoot.from_json(raw)))


BODY_MISMATCH = "transparency log entry is inconsistent with other materials"


# hashes and encoded values quoted in a message ("expected ..., calculated ..."): random text
# that may hold "sct" or "chain" by chance (found in CI: a tampered root hash whose base64
# held one became certificate-invalid), so they go before the words are matched
_DATA = re.compile(r"[0-9a-z+/=_-]{20,}")


def _reason(message: str, leaf: x509.Certificate, entries: Tuple[TlogEntry, ...]) -> Reason:
    """Most precise code for a sigstore-python failure message (the text stays the detail)."""
    text = _DATA.sub(" ", message.lower())
    if "digest mismatch" in text:
        return Reason.DIGEST_MISMATCH
    if "chain" in text:
        claimed = [datetime.fromtimestamp(e.integrated_time, tz=timezone.utc)
                   for e in entries if e.integrated_time]
        if any(not leaf.not_valid_before_utc <= t <= leaf.not_valid_after_utc for t in claimed):
            return Reason.CERTIFICATE_INVALID  # the leaf had expired (or not begun) by then
        return Reason.UNTRUSTED_ROOT
    if "no timestamp authorities" in text:
        return Reason.UNTRUSTED_ROOT
    if "expired" in text or "sct" in text or "usage" in text or "certificate" in text:
        return Reason.CERTIFICATE_INVALID
    if ("log entry" in text or "inclusion" in text or "checkpoint" in text or "set:" in text
            or "timestamp" in text or "verified time" in text or "rekor" in text):
        return Reason.TLOG_INVALID
    return Reason.BAD_SIGNATURE


def verify_keyless(artifact: Artifact, parsed: ParsedBundle, doc: Dict[str, Any], source: str,
                   trust: TrustConfig, claim: Evidence) -> Verdict:
    if trust.trusted_root is None or not trust.identities:
        return Verdict.fail(Reason.NO_TRUST_CONFIGURED, f"{source}: keyless bundle needs a "
                            "trusted root and at least one trusted identity", claim)
    try:
        leaf = x509.load_der_x509_certificate(parsed.certs[0])
    except ValueError as exc:
        return Verdict.fail(Reason.MALFORMED_SIGNATURE, f"{source}: certificate: {exc}", claim)
    if parsed.hash_name != "sha256":
        return Verdict.fail(Reason.UNSUPPORTED_SIGNATURE, f"{source}: keyless bundles with "
                            f"{parsed.hash_name} message digests are not supported", claim)
    entries = parsed.tlog_entries
    if (parsed.version == "0.1" and len(entries) == 1 and entries[0].proof is None
            and entries[0].signed_entry_timestamp is not None):
        return verify_fulcio_signed(artifact, leaf, parsed.signature, entries[0], source,
                                    trust, claim)
    san, issuer, _ = match_identity(leaf, trust.identities)
    evidence = replace(claim, identity=san, issuer=issuer, extensions=fulcio_extensions(leaf),
                       integrated_time=(entries[0].integrated_time or None) if entries else None)
    try:
        verifier = _verifier(trust.trusted_root)
    except Exception as exc:  # pydantic and sigstore errors alike: the root is unusable
        return Verdict.fail(Reason.NO_TRUST_CONFIGURED, f"{trust.trusted_root_source or 'trusted'}"
                            f" root unusable for keyless verification: {exc}", evidence)
    try:
        bundle = Bundle.from_json(json.dumps(normalize_bundle(doc)))
    except InvalidBundle as exc:
        return Verdict.fail(Reason.MALFORMED_SIGNATURE, f"{source}: {exc}", evidence)
    try:
        verifier.verify_artifact(Hashed(algorithm=HashAlgorithm.SHA2_256,
                                        digest=artifact.sha256), bundle,
                                 IdentityPolicy(trust.identities))
    except IdentityError as exc:
        return Verdict.fail(Reason.IDENTITY_MISMATCH, f"{source}: {exc}", evidence)
    except VerificationError as exc:
        if str(exc) != BODY_MISMATCH:
            return Verdict.fail(_reason(str(exc), leaf, entries), f"{source}: {exc}", evidence)
        # Raised only by the last step (all else verified): sigstore-python compares the
        # body's PEM *text* with its own encoding. Redo that step comparing DER.
        try:
            for entry in entries:
                check_hashedrekord(entry, artifact.sha256, parsed.signature, parsed.certs[0])
        except TlogError as body_exc:
            return Verdict.fail(Reason.TLOG_INVALID, f"{source}: {body_exc}", evidence)
        note = " (log body compared as DER)"
    except Exception as exc:  # the library leaks TypeError etc. on odd input: all deny
        return Verdict.fail(_reason(str(exc), leaf, entries), f"{source}: {exc}", evidence)
    else:
        note = ""
    return Verdict.ok(evidence, f"{source}: bundle v{parsed.version} signed by {san} from "
                      f"{issuer}" + (f", Rekor index {entries[0].log_index}" if entries else "")
                      + note)
