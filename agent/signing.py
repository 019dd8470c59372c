"""Key generation, cosign-format encrypted private keys, and cosign-compatible signing.

The encrypted key is the format cosign writes (go-securesystemslib ``encrypted``): a PEM
whose body is JSON with an scrypt KDF and a NaCl secretbox over the PKCS#8 DER key. Only
the scrypt parameter sets cosign accepts are read, so a hostile key file cannot make us
burn memory. Signatures use the key's registry hash, exactly like ``cosign sign-blob``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from typing import Any, Callable, Dict, Tuple, Union

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from agent.digest import Artifact
from agent.errors import MalformedInput
from agent.verify import keys

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]

ALGORITHMS = ("ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "rsa-4096", "ed25519")
ENCRYPTED_LABELS = ("ENCRYPTED SIGSTORE PRIVATE KEY", "ENCRYPTED COSIGN PRIVATE KEY")
PLAIN_LABELS = ("PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY")
SCRYPT_N_ALLOWED = (32768, 65536, 131072)  # cosign's accepted sets, always r=8 p=1
SCRYPT_N, SCRYPT_R, SCRYPT_P = 65536, 8, 1
MAX_PRIVATE_KEY_FILE = 64 * 1024
_HASHES: Dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}

PasswordFn = Callable[[], bytes]


class WrongPassword(MalformedInput):
    """The key decrypts with a different password (or its ciphertext was altered)."""


def generate(algorithm: str = "ecdsa-p256") -> PrivateKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "rsa-4096":
        return rsa.generate_private_key(public_exponent=65537, key_size=4096)
    curves: Dict[str, ec.EllipticCurve] = {
        "ecdsa-p256": ec.SECP256R1(), "ecdsa-p384": ec.SECP384R1(), "ecdsa-p521": ec.SECP521R1()}
    if algorithm not in curves:
        raise ValueError(f"unknown algorithm {algorithm!r} (choose from {', '.join(ALGORITHMS)})")
    return ec.generate_private_key(curves[algorithm])


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    # hashlib's default maxmem (32 MiB) is below what N=65536 r=8 needs (64 MiB).
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=32,
                          maxmem=128 * r * n + (64 << 20))


def _pem(label: str, der: bytes) -> bytes:
    body = base64.b64encode(der).decode()
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    text = "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"])
    return (text + "\n").encode()


def pkcs8_der(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def encrypt_private_key(key: PrivateKey, password: bytes) -> bytes:
    """An ``ENCRYPTED SIGSTORE PRIVATE KEY`` PEM, as ``cosign generate-key-pair`` writes."""
    from nacl.secret import SecretBox

    salt, nonce = secrets.token_bytes(32), secrets.token_bytes(24)
    box_key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    sealed = SecretBox(box_key).encrypt(pkcs8_der(key), nonce).ciphertext  # tag || ciphertext
    doc = {
        "kdf": {"name": "scrypt", "params": {"N": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
                "salt": base64.b64encode(salt).decode()},
        "cipher": {"name": "nacl/secretbox", "nonce": base64.b64encode(nonce).decode()},
        "ciphertext": base64.b64encode(sealed).decode(),
    }
    return _pem(ENCRYPTED_LABELS[0], json.dumps(doc, separators=(",", ":")).encode())


def plain_private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.PEM,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def _pem_block(data: bytes, source: str) -> Tuple[str, bytes]:
    text = data.decode("ascii", "replace")
    start = text.find("-----BEGIN ")
    if start < 0:
        raise MalformedInput(source, "not a PEM private key (no BEGIN line)")
    label_end = text.find("-----", start + 11)
    label = text[start + 11:label_end]
    end = text.find(f"-----END {label}-----", label_end)
    if label_end < 0 or end < 0:
        raise MalformedInput(source, "truncated PEM (no END line)")
    try:
        body = base64.b64decode("".join(text[label_end + 5:end].split()), validate=True)
    except ValueError:
        raise MalformedInput(source, f"{label} PEM body is not base64") from None
    return label, body


def _b64field(doc: Dict[str, Any], *path: str) -> bytes:
    value: Any = doc
    for name in path:
        value = value[name]
    if not isinstance(value, str):
        raise TypeError(".".join(path))
    return base64.b64decode(value, validate=True)


def decrypt_private_key(body: bytes, password: bytes, source: str) -> PrivateKey:
    """Decrypt the JSON body of a cosign encrypted key. Raises MalformedInput/WrongPassword."""
    from nacl.exceptions import CryptoError
    from nacl.secret import SecretBox

    try:
        doc = json.loads(body)
        kdf, cipher = doc["kdf"], doc["cipher"]
        params = kdf["params"]
        n, r, p = int(params["N"]), int(params["r"]), int(params["p"])
        salt = _b64field(doc, "kdf", "salt")
        nonce = _b64field(doc, "cipher", "nonce")
        sealed = _b64field(doc, "ciphertext")
    except (ValueError, KeyError, TypeError) as exc:
        raise MalformedInput(source, f"encrypted key JSON is malformed ({exc})") from None
    if kdf.get("name") != "scrypt" or cipher.get("name") != "nacl/secretbox":
        raise MalformedInput(source, f"unsupported key encryption {kdf.get('name')}/"
                                     f"{cipher.get('name')} (want scrypt/nacl/secretbox)")
    if n not in SCRYPT_N_ALLOWED or r != 8 or p != 1:
        raise MalformedInput(source, f"scrypt parameters N={n} r={r} p={p} are not one of "
                                     "cosign's accepted sets (N 32768/65536/131072, r=8, p=1)")
    if len(nonce) != SecretBox.NONCE_SIZE:
        raise MalformedInput(source, f"secretbox nonce is {len(nonce)} bytes, not 24")
    try:
        der = SecretBox(_scrypt(password, salt, n, r, p)).decrypt(sealed, nonce)
    except CryptoError:
        raise WrongPassword(source, "wrong password, or the encrypted key is corrupted") from None
    # cosign stores PKCS#8 and rejects anything else (a SEC1 "EC PRIVATE KEY" inside).
    if not _is_pkcs8(der):
        raise MalformedInput(source, "decrypted key is not PKCS#8 (cosign would refuse it)")
    return _load_der(der, source)


def _is_pkcs8(der: bytes) -> bool:
    # PrivateKeyInfo ::= SEQUENCE { INTEGER version, SEQUENCE algorithm, OCTET STRING key }
    # SEC1 and PKCS#1 put an OCTET STRING or INTEGER after the version instead.
    if len(der) < 8 or der[0] != 0x30:
        return False
    pos = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
    if der[pos:pos + 3] not in (b"\x02\x01\x00", b"\x02\x01\x01"):
        return False
    return der[pos + 3:pos + 4] == b"\x30"


def _load_der(der: bytes, source: str) -> PrivateKey:
    try:
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise MalformedInput(source, f"not a private key ({exc})") from None
    return _check(key, source)


def _check(key: Any, source: str) -> PrivateKey:
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey,
                            ed25519.Ed25519PrivateKey)):
        raise MalformedInput(source, f"unsupported private key type {type(key).__name__}")
    keys.check_supported(key.public_key(), source)
    return key


def load_private_key(data: bytes, source: str, password: PasswordFn | None) -> PrivateKey:
    """A cosign encrypted key (asks ``password``) or a plain PEM private key."""
    if len(data) > MAX_PRIVATE_KEY_FILE:
        raise MalformedInput(source, f"{len(data)} bytes is too large for a private key")
    label, body = _pem_block(data, source)
    if label in ENCRYPTED_LABELS:
        if password is None:
            raise MalformedInput(source, "key is encrypted and no password was given")
        return decrypt_private_key(body, password(), source)
    if label in PLAIN_LABELS:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise MalformedInput(source, f"{label} PEM does not parse ({exc})") from None
        return _check(key, source)
    if "PUBLIC KEY" in label:
        raise MalformedInput(source, "is a public key; signing needs the private key")
    raise MalformedInput(source, f"unsupported PEM type {label!r} (want a cosign "
                                 "encrypted key or a PRIVATE KEY PEM)")


def sign_artifact(key: PrivateKey, artifact: Artifact) -> bytes:
    """The raw signature over the file's bytes, hashed as the key's registry entry says."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(artifact.read_all())  # pure Ed25519, as cosign signs without Rekor
    hash_name = keys.candidate_hashes(key.public_key())[0] or "sha256"
    algo = _HASHES[hash_name]()
    digest = artifact.digest(hash_name)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(digest, ec.ECDSA(Prehashed(algo)))
    return key.sign(digest, padding.PKCS1v15(), Prehashed(algo))


def write_file(path: str, data: bytes, mode: int, force: bool) -> None:
    """Write ``data`` with ``mode``; refuse an existing file unless ``force`` (then atomic)."""
    if force:
        directory = os.path.dirname(os.path.abspath(path))
        target = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    else:
        target = path  # O_EXCL: never clobber, even if the path appears after a check
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # the umask must not change it
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            os.replace(target, path)
    except BaseException:
        os.unlink(target)
        raise
