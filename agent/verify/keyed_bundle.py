"""Managed-key bundles (``verificationMaterial.publicKey.hint``), verified with cryptography.

sigstore-python cannot load these at all. The key is found by its hint (base64 sha256 of the
SPKI DER) among the host's trusted keys; the bundle never carries the key itself. Log entries
are optional for a pinned key, but any entry present must be valid and about this signature.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import replace
from typing import Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.digest import Artifact
from agent.errors import MalformedInput, Reason
from agent.verify.bundle import ParsedBundle
from agent.verify.keys import describe_key, spki_der, verify_prehashed
from agent.verify.model import Evidence, TrustConfig, TrustedKey, Verdict
from agent.verify.tlog import TlogError, check_hashedrekord, verify_entry
from agent.verify.trusted_root import TrustRoot, cached_trusted_root


def find_key(hint: str, trust: TrustConfig) -> Optional[TrustedKey]:
    for key in trust.keys:
        if base64.b64encode(hashlib.sha256(spki_der(key.public_key)).digest()).decode() == hint:
            return key
    return None


def verify_key_bundle(artifact: Artifact, parsed: ParsedBundle, source: str,
                      trust: TrustConfig, claim: Evidence) -> Verdict:
    if not trust.keys:
        return Verdict.fail(Reason.NO_TRUST_CONFIGURED,
                            f"{source}: managed-key bundle but no trusted keys are configured",
                            claim)
    key = find_key(parsed.key_hint or "", trust)
    if key is None:
        return Verdict.fail(Reason.UNTRUSTED_KEY, f"{source}: signed by a key that is not "
                            f"trusted (hint {parsed.key_hint})", claim)
    evidence = replace(claim, key_fingerprint=key.fingerprint)
    digest = artifact.digest(parsed.hash_name)
    try:
        if isinstance(key.public_key, ed25519.Ed25519PublicKey):
            # Ed25519 signs the message itself in a messageSignature bundle.
            key.public_key.verify(parsed.signature, artifact.read_all())
        else:
            verify_prehashed(key.public_key, parsed.signature, digest, parsed.hash_name)
    except InvalidSignature:
        return Verdict.fail(Reason.BAD_SIGNATURE, f"{source}: signature does not verify with "
                            f"{describe_key(key.public_key)} key {key.source} "
                            f"({parsed.hash_name})", evidence)
    if not parsed.tlog_entries:
        return Verdict.ok(evidence, f"{source}: managed-key bundle v{parsed.version} signed by "
                          f"{key.source} ({key.fingerprint}); no transparency log entry")
    if trust.trusted_root is None:
        return Verdict.fail(Reason.NO_TRUST_CONFIGURED, f"{source}: bundle has transparency "
                            "log entries but no trusted_root.json is configured to check them",
                            evidence)
    try:
        root = _root(trust)
    except MalformedInput as exc:
        return Verdict.fail(Reason.NO_TRUST_CONFIGURED, str(exc), evidence)
    integrated = None
    try:
        for entry in parsed.tlog_entries:
            if parsed.hash_name != "sha256":
                raise TlogError("log entries are checked for SHA-256 digests only")
            when = verify_entry(entry, root, require_proof=parsed.version != "0.1")
            check_hashedrekord(entry, digest, parsed.signature, spki_der(key.public_key))
            if when is not None and integrated is None:
                integrated = entry.integrated_time
    except TlogError as exc:
        return Verdict.fail(Reason.TLOG_INVALID, f"{source}: {exc}", evidence)
    evidence = replace(evidence, integrated_time=integrated)
    return Verdict.ok(evidence, f"{source}: managed-key bundle v{parsed.version} signed by "
                      f"{key.source} ({key.fingerprint}), in transparency log at index "
                      f"{parsed.tlog_entries[0].log_index}")


def _root(trust: TrustConfig) -> TrustRoot:
    return cached_trusted_root(trust.trusted_root or b"",
                              trust.trusted_root_source or "trusted_root.json")
