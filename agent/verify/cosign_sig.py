"""cosign key-based ``.sig``: base64 of a raw signature over the file bytes, checked with keys.

Reason rule. A ``.sig`` names no key, so when no trusted key verifies it we cannot tell a
changed file from a signature by some other key: that is ``bad-signature``. The one thing
the signature itself reveals is the *type* (and, for ECDSA, the minimum curve size, for RSA
the modulus size) of the key that made it. When no trusted key could possibly have made a
signature of that shape, the signer is certainly someone else: ``untrusted-key``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, List, Tuple

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agent.digest import Artifact
from agent.errors import MalformedInput, Reason
from agent.verify import keys
from agent.verify.model import Evidence, SignatureKind, TrustConfig, TrustedKey, Verdict

MAX_SIGNATURE = 4096  # decoded bytes; RSA-8192 is 1024, an ECDSA P-521 DER at most 139
_RSA_SIZES = (256, 384, 512)  # RSA 2048/3072/4096 signature lengths
_ED25519_SIZE = 64


@dataclass(frozen=True)
class SigShape:
    """What the raw signature bytes say about the key type that made them."""

    family: str  # "ecdsa" | "ed25519" | "rsa"
    raw: bytes
    ecdsa_bits: int = 0  # max bit length of r and s (a lower bound on the curve size)

    def describe(self) -> str:
        if self.family == "ecdsa":
            return f"an ECDSA signature (r/s of up to {self.ecdsa_bits} bits)"
        if self.family == "rsa":
            return f"an RSA-{len(self.raw) * 8} signature"
        return "an Ed25519 signature"


def decode_signature(data: bytes, source: str) -> bytes:
    """The raw signature from a ``.sig`` file: base64 (whitespace ignored), else raw bytes."""
    if not data.strip():
        raise MalformedInput(source, "signature file is empty")
    text = b"".join(data.split())
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = data  # cosign also accepts the raw DER when the input is not base64
    if not raw:
        raise MalformedInput(source, "signature decodes to nothing")
    if len(raw) > MAX_SIGNATURE:
        raise MalformedInput(source, f"signature is {len(raw)} bytes, far above any key's")
    return raw


def _der_len(buf: bytes, pos: int) -> Tuple[int, int]:
    """Parse a DER length at ``pos``; returns (length, next position). Raises ValueError."""
    if pos >= len(buf):
        raise ValueError("truncated")
    first = buf[pos]
    if first < 0x80:
        return first, pos + 1
    count = first & 0x7F
    if count == 0 or count > 2 or pos + 1 + count > len(buf):
        raise ValueError("bad length")
    value = int.from_bytes(buf[pos + 1:pos + 1 + count], "big")
    if value < 0x80 or (count == 2 and value < 0x100):
        raise ValueError("non-minimal length")
    return value, pos + 1 + count


def _der_int(buf: bytes, pos: int) -> Tuple[int, int]:
    if pos >= len(buf) or buf[pos] != 0x02:
        raise ValueError("expected INTEGER")
    length, pos = _der_len(buf, pos + 1)
    body = buf[pos:pos + length]
    if length == 0 or len(body) != length:
        raise ValueError("truncated INTEGER")
    if body[0] & 0x80:
        raise ValueError("negative INTEGER")
    if length > 1 and body[0] == 0 and not body[1] & 0x80:
        raise ValueError("non-minimal INTEGER")
    return int.from_bytes(body, "big"), pos + length


def ecdsa_bits(raw: bytes) -> int | None:
    """Max bit length of (r, s) if ``raw`` is exactly a DER ECDSA signature, else None."""
    try:
        if len(raw) < 8 or raw[0] != 0x30:
            return None
        length, pos = _der_len(raw, 1)
        if pos + length != len(raw):
            return None
        r, pos = _der_int(raw, pos)
        s, pos = _der_int(raw, pos)
    except ValueError:
        return None
    if pos != len(raw) or r == 0 or s == 0:
        return None
    return max(r.bit_length(), s.bit_length())


def classify(raw: bytes, source: str) -> SigShape:
    bits = ecdsa_bits(raw)
    if bits is not None:
        if bits > 521:
            raise MalformedInput(source, f"ECDSA signature values of {bits} bits fit no curve")
        return SigShape("ecdsa", raw, bits)
    if len(raw) == _ED25519_SIZE:
        return SigShape("ed25519", raw)
    if len(raw) in _RSA_SIZES:
        return SigShape("rsa", raw)
    if raw[:1] == b"\x30":
        raise MalformedInput(source, f"truncated or invalid DER signature ({len(raw)} bytes)")
    raise MalformedInput(source, f"{len(raw)} bytes is neither a DER ECDSA, an Ed25519 "
                                 "nor an RSA signature")


def could_have_signed(shape: SigShape, key: Any) -> bool:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return len(shape.raw) == _ED25519_SIZE  # even when the 64 bytes happen to parse as DER
    if shape.family == "ecdsa":
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size >= shape.ecdsa_bits
    if shape.family == "rsa":
        return isinstance(key, rsa.RSAPublicKey) and (key.key_size + 7) // 8 == len(shape.raw)
    return isinstance(key, ed25519.Ed25519PublicKey)


def verify_sig(artifact: Artifact, data: bytes, source: str, trust: TrustConfig) -> Verdict:
    """Verdict for one ``.sig`` file's content. Never raises for bad signature input."""
    unproven = Evidence(SignatureKind.COSIGN_SIG, source)
    try:
        shape = classify(decode_signature(data, source), source)
    except MalformedInput as exc:
        return Verdict.fail(Reason.MALFORMED_SIGNATURE, exc.problem, unproven)
    if not trust.keys:
        return Verdict.fail(Reason.NO_TRUST_CONFIGURED,
                            "a cosign .sig needs a trusted public key and none is configured",
                            unproven)
    candidates: List[TrustedKey] = [k for k in trust.keys
                                    if could_have_signed(shape, k.public_key)]
    if not candidates and shape.family != "ecdsa" and shape.raw[:1] == b"\x30":
        # 64/256/384/512 bytes starting like DER and failing to parse as DER: far likelier a
        # cut ECDSA signature than an Ed25519/RSA one, when no such key is trusted anyway.
        return Verdict.fail(Reason.MALFORMED_SIGNATURE,
                            f"truncated or invalid DER signature ({len(shape.raw)} bytes)",
                            unproven)
    if not candidates:
        return Verdict.fail(Reason.UNTRUSTED_KEY,
                            f"{shape.describe()}, and no trusted key ({len(trust.keys)}) "
                            "is of a type that could have made it", unproven)
    tried = []
    for key in candidates:
        try:
            valid, hash_used = keys.verify_over_artifact(key.public_key, shape.raw, artifact)
        except (ValueError, TypeError) as exc:  # cryptography rejecting odd input
            valid, hash_used = False, f"error: {exc}"
        if valid:
            evidence = Evidence(SignatureKind.COSIGN_SIG, source, key_fingerprint=key.fingerprint)
            return Verdict.ok(evidence, f"signed by {key.fingerprint} "
                              f"({keys.describe_key(key.public_key)}, {hash_used}) "
                              f"from {key.source}")
        tried.append(f"{key.fingerprint[:19]}… ({hash_used})")
    return Verdict.fail(Reason.BAD_SIGNATURE,
                        f"{shape.describe()} that no trusted key verifies over this file "
                        f"(tried {', '.join(tried)}): the file changed since signing, or "
                        "another key signed it", unproven)
