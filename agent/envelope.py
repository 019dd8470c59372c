"""Signed envelopes for execguard's own documents: policy bundles and break-glass tokens.

The format is DSSE (in-toto's Dead Simple Signing Envelope) in its JSON form. Signatures
cover ``PAE(payloadType, payload)``, so a signature made for one kind of document, or over
a binary, never verifies as another kind. ``keyid`` is the signer's fingerprint
(``sha256:`` of the SPKI DER, as everywhere in execguard); it only selects a pinned key,
it is never trusted on its own.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Tuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from agent.errors import MalformedInput
from agent.signing import PrivateKey
from agent.verify.keys import key_fingerprint
from agent.verify.model import TrustedKey

MAX_ENVELOPE = 16 * 1024 * 1024
MAX_SIGNATURES = 64

_CURVE_HASH: Dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384, "secp521r1": hashes.SHA512}


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: lengths first, so no two inputs collide."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def sign_message(key: PrivateKey, message: bytes) -> bytes:
    """ECDSA with the curve's registry hash, RSA PKCS#1 v1.5 SHA-256, or pure Ed25519."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(_CURVE_HASH[key.curve.name]()))
    assert isinstance(key, rsa.RSAPrivateKey)
    return key.sign(message, padding.PKCS1v15(), hashes.SHA256())


def signature_valid(public_key: Any, signature: bytes, message: bytes) -> bool:
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            algo = _CURVE_HASH.get(public_key.curve.name)
            if algo is None:
                return False
            public_key.verify(signature, message, ec.ECDSA(algo()))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: Tuple[Signature, ...] = ()

    def signed_by(self, key: PrivateKey) -> Envelope:
        """A copy with one more signature; signing twice with one key replaces the first."""
        keyid = key_fingerprint(key.public_key())
        sig = Signature(keyid, sign_message(key, pae(self.payload_type, self.payload)))
        kept = tuple(s for s in self.signatures if s.keyid != keyid)
        return Envelope(self.payload_type, self.payload, (*kept, sig))

    def to_json(self) -> Dict[str, Any]:
        return {"payloadType": self.payload_type,
                "payload": base64.b64encode(self.payload).decode(),
                "signatures": [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()}
                               for s in self.signatures]}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=1, sort_keys=True).encode() + b"\n"


@dataclass(frozen=True)
class SignatureReport:
    """Which distinct pinned keys signed validly; what failed, and what nobody pins."""

    valid: Tuple[str, ...]  # fingerprints of pinned keys whose signature verifies
    invalid: Tuple[str, ...]  # pinned keys named by a signature that does not verify
    unknown: Tuple[str, ...]  # keyids that no pinned key has

    def meets(self, threshold: int) -> bool:
        return len(self.valid) >= threshold


def check_signatures(env: Envelope, pinned: Mapping[str, TrustedKey]) -> SignatureReport:
    """Count each pinned key once, however many signatures name it."""
    message = pae(env.payload_type, env.payload)
    valid: List[str] = []
    invalid: List[str] = []
    unknown: List[str] = []
    for s in env.signatures:
        key = pinned.get(s.keyid)
        if key is None:
            unknown.append(s.keyid)
        elif signature_valid(key.public_key, s.sig, message):
            if s.keyid not in valid:
                valid.append(s.keyid)
        else:
            invalid.append(s.keyid)
    return SignatureReport(tuple(valid), tuple(k for k in invalid if k not in valid),
                           tuple(dict.fromkeys(unknown)))


def _b64(value: Any, where: str, source: str) -> bytes:
    if not isinstance(value, str):
        raise MalformedInput(source, f"{where}: expected base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedInput(source, f"{where}: not valid base64") from None


def parse_envelope(data: bytes, source: str, payload_type: str) -> Envelope:
    """Parse the JSON envelope and insist on ``payload_type``; errors name ``source``."""
    if len(data) > MAX_ENVELOPE:
        raise MalformedInput(source, f"{len(data)} bytes is larger than {MAX_ENVELOPE}")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # deeply nested JSON
        raise MalformedInput(source, f"not a JSON signed envelope ({exc})") from None
    if not isinstance(doc, dict):
        raise MalformedInput(source, "not a JSON object")
    kind = doc.get("payloadType")
    if kind != payload_type:
        raise MalformedInput(source, f"payloadType is {kind!r}, expected {payload_type!r}")
    payload = _b64(doc.get("payload"), "payload", source)
    raw_sigs = doc.get("signatures", [])
    if not isinstance(raw_sigs, list) or len(raw_sigs) > MAX_SIGNATURES:
        raise MalformedInput(source, f"signatures: expected a list of at most {MAX_SIGNATURES}")
    sigs = []
    for i, raw in enumerate(raw_sigs):
        if not isinstance(raw, dict) or not isinstance(raw.get("keyid"), str):
            raise MalformedInput(source, f"signatures[{i}]: expected {{keyid, sig}}")
        sigs.append(Signature(raw["keyid"], _b64(raw.get("sig"), f"signatures[{i}].sig", source)))
    return Envelope(payload_type, payload, tuple(sigs))
