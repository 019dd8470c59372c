"""Public keys: load PEM, fingerprint, and check a signature with the right hash for the key.

Hashes follow the Sigstore algorithm registry (P-256/RSA: SHA-256, P-384: SHA-384,
P-521: SHA-512). Older cosign signed with SHA-256 whatever the curve, so that is tried
second for P-384/P-521. Ed25519 signs the message itself (cosign's ``.sig`` without Rekor).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from agent.digest import Artifact
from agent.errors import MalformedInput
from agent.fileio import read_small_file
from agent.verify.model import TrustedKey

PublicKey = Union[ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey]

_HASHES: Dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
MAX_KEY_FILE = 64 * 1024


def spki_der(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo))


def key_fingerprint(public_key: Any) -> str:
    """``sha256:<hex>`` of the SubjectPublicKeyInfo DER: stable across PEM re-wrapping."""
    return "sha256:" + hashlib.sha256(spki_der(public_key)).hexdigest()


def key_hint(public_key: Any) -> str:
    """The Sigstore bundle ``publicKey.hint``: base64 of sha256(SPKI DER)."""
    return base64.b64encode(hashlib.sha256(spki_der(public_key)).digest()).decode()


def parse_public_key(data: bytes, source: str) -> TrustedKey:
    """Parse a PEM (or DER) public key; anything else is a clear MalformedInput."""
    if len(data) > MAX_KEY_FILE:
        raise MalformedInput(source, f"key file is {len(data)} bytes, not a public key")
    try:
        if b"-----BEGIN" in data:
            if b"PRIVATE KEY-----" in data:
                raise MalformedInput(source, "is a private key; give the public key (.pub)")
            key: Any = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except MalformedInput:
        raise
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise MalformedInput(source, f"not a PEM public key ({exc})") from None
    check_supported(key, source)
    return TrustedKey(key, key_fingerprint(key), source)


def load_public_key(path: str) -> TrustedKey:
    return parse_public_key(read_small_file(path, MAX_KEY_FILE, "a public key file"), path)


def check_supported(key: Any, source: str) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise MalformedInput(source, f"unsupported curve {key.curve.name}")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise MalformedInput(source, f"RSA key of {key.key_size} bits is too small")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise MalformedInput(source, f"unsupported key type {type(key).__name__}")


def describe_key(key: Any) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    return "Ed25519"


def candidate_hashes(key: Any) -> List[Optional[str]]:
    """Hashes to try for a bare ``.sig``, registry default first; None = pure (Ed25519)."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": ["sha256"], "secp384r1": ["sha384", "sha256"],
                "secp521r1": ["sha512", "sha256"]}.get(key.curve.name, ["sha256"])  # type: ignore[return-value]
    if isinstance(key, rsa.RSAPublicKey):
        return ["sha256"]
    return [None]


def verify_prehashed(key: Any, signature: bytes, digest: bytes, hash_name: str) -> None:
    """Check ``signature`` over a precomputed digest. Raises InvalidSignature."""
    algo = _HASHES[hash_name]()
    if len(digest) != algo.digest_size:
        raise InvalidSignature("digest length does not match its algorithm")
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, digest, ec.ECDSA(Prehashed(algo)))
    elif isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, digest, padding.PKCS1v15(), Prehashed(algo))
    else:
        raise InvalidSignature(f"{describe_key(key)} cannot verify a prehashed digest")


def verify_over_artifact(key: Any, signature: bytes, artifact: Artifact) -> Tuple[bool, str]:
    """Try the key's candidate hashes over the file; returns (valid, hash used or tried)."""
    tried = []
    for hash_name in candidate_hashes(key):
        try:
            if hash_name is None:
                key.verify(signature, artifact.read_all())
                return True, "ed25519"
            verify_prehashed(key, signature, artifact.digest(hash_name), hash_name)
            return True, hash_name
        except InvalidSignature:
            tried.append(hash_name or "ed25519")
    return False, "/".join(tried)
