"""Verification facade: discover a file's signatures, try each, keep every attempt.

``verify_artifact`` never raises for bad signature input; an I/O error on the artifact
itself (or on a signature file the caller named explicitly) propagates as ``InputError``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import List

from agent.digest import Artifact
from agent.errors import InputError, Reason
from agent.verify import discovery
from agent.verify.bundle import verify_bundle
from agent.verify.cosign_sig import verify_sig
from agent.verify.discovery import MAX_SIGNATURE_FILE, Candidate
from agent.verify.model import Evidence, SignatureKind, TrustConfig, Verdict

__all__ = ["verify_artifact", "verify_candidate"]

# When nothing is trusted, report the failure that says most about the signer: a valid
# signature by the wrong party beats a broken one, which beats not finding anything.
_RANK = {reason: i for i, reason in enumerate((
    Reason.IDENTITY_MISMATCH, Reason.UNTRUSTED_KEY, Reason.UNTRUSTED_ROOT,
    Reason.CERTIFICATE_INVALID, Reason.TLOG_INVALID, Reason.DIGEST_MISMATCH,
    Reason.BAD_SIGNATURE, Reason.UNSUPPORTED_SIGNATURE, Reason.MALFORMED_SIGNATURE,
    Reason.NO_TRUST_CONFIGURED, Reason.NO_SIGNATURE,
))}


def _guess_bundle_kind(data: bytes) -> SignatureKind:
    """Best guess for labelling a bundle attempt whose verifier returned no evidence."""
    try:
        doc = json.loads(data)
    except ValueError:
        return SignatureKind.BUNDLE_KEYLESS
    if isinstance(doc, dict):
        if "rekorBundle" in doc or "base64Signature" in doc:
            return SignatureKind.COSIGN_LEGACY_BUNDLE
        material = doc.get("verificationMaterial")
        if isinstance(material, dict) and "publicKey" in material:
            return SignatureKind.BUNDLE_KEY
    return SignatureKind.BUNDLE_KEYLESS


def verify_candidate(artifact: Artifact, cand: Candidate, trust: TrustConfig) -> Verdict:
    """One attempt; the verdict always carries evidence naming the candidate's source."""
    kind = (SignatureKind.COSIGN_SIG if cand.kind == "sig"
            else _guess_bundle_kind(cand.data))
    if cand.error is not None:
        verdict = Verdict.fail(Reason.MALFORMED_SIGNATURE, f"cannot read: {cand.error}")
    elif cand.oversized:
        verdict = Verdict.fail(Reason.MALFORMED_SIGNATURE,
                               f"larger than the {MAX_SIGNATURE_FILE}-byte limit")
    else:
        try:
            verdict = (verify_sig(artifact, cand.data, cand.source, trust) if cand.kind == "sig"
                       else verify_bundle(artifact, cand.data, cand.source, trust))
        except InputError:
            raise  # the artifact itself could not be read
        except Exception as exc:  # a verifier bug must fail closed, not crash the caller
            verdict = Verdict.fail(Reason.MALFORMED_SIGNATURE,
                                   f"verifier failed: {type(exc).__name__}: {exc}")
    if verdict.evidence is None:
        verdict = dataclasses.replace(verdict, evidence=Evidence(kind, cand.source))
    return verdict


def verify_artifact(artifact: Artifact, trust: TrustConfig, signature_path: str | None = None,
                    bundle_path: str | None = None) -> Verdict:
    """Trusted if any candidate signature is; otherwise the most informative failure."""
    _ = artifact.sha256  # hash first: an unreadable artifact is an InputError, not a verdict
    if signature_path is not None or bundle_path is not None:
        cands: List[Candidate] = []
        if signature_path is not None:
            cands.append(discovery.explicit(signature_path, "sig"))
        if bundle_path is not None:
            cands.append(discovery.explicit(bundle_path, "bundle"))
    else:
        cands = discovery.discover(artifact, trust)
    if not cands:
        looked = ", ".join(discovery.locations(artifact, trust))
        return Verdict.fail(Reason.NO_SIGNATURE, f"no signature found (looked for {looked})")
    attempts: List[Verdict] = []
    for cand in cands:
        verdict = verify_candidate(artifact, cand, trust)
        attempts.append(verdict)
        if verdict.trusted:
            return dataclasses.replace(verdict, attempts=tuple(attempts))
    best = min(attempts, key=lambda v: _RANK.get(v.reason, len(_RANK)))
    return dataclasses.replace(best, attempts=tuple(attempts))
