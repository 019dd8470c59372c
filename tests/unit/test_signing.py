"""Signing: cosign's encrypted key format (against keys cosign made), plain PEM keys, and
signatures OpenSSL accepts, hashed the way cosign hashes them."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Dict

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent import signing
from agent.digest import Artifact
from agent.errors import MalformedInput
from agent.verify import keys
from tests import keymaterial as km


@pytest.fixture(scope="module")
def keyset(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, km.KeyFiles]:
    return km.generate_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture()
def blob(tmp_path: Path) -> Path:
    p = tmp_path / "blob"
    p.write_bytes(os.urandom(100_000))
    return p


def sign_and_check_with_openssl(key: signing.PrivateKey, blob: Path, tmp: Path,
                                digest: str | None) -> None:
    pub = tmp / "derived.pub"
    pub.write_bytes(signing.public_pem(key.public_key()))
    with Artifact.open(str(blob)) as art:
        raw = signing.sign_artifact(key, art)
    kf = km.KeyFiles("derived", tmp / "unused", pub, digest)
    assert km.openssl_verify(kf, raw, blob, tmp)


# --- keys cosign made ----------------------------------------------------------------------

@pytest.mark.parametrize("pem", [km.COSIGN_SIGSTORE_LABEL, km.COSIGN_LEGACY_LABEL])
def test_cosign_made_keys_decrypt_with_hello(pem: str, blob: Path, tmp_path: Path) -> None:
    key = signing.load_private_key(pem.encode(), "cosign.key", lambda: b"hello")
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    sign_and_check_with_openssl(key, blob, tmp_path, "sha256")


def test_cosign_made_key_with_empty_password(blob: Path, tmp_path: Path) -> None:
    key = signing.load_private_key(km.COSIGN_EMPTY_PASSWORD.encode(), "k", lambda: b"")
    sign_and_check_with_openssl(key, blob, tmp_path, "sha256")


def test_wrong_password_is_a_clear_error() -> None:
    with pytest.raises(signing.WrongPassword, match="wrong password"):
        signing.load_private_key(km.COSIGN_SIGSTORE_LABEL.encode(), "k", lambda: b"nope")


def test_sec1_plaintext_is_refused_like_cosign() -> None:
    with pytest.raises(MalformedInput, match="not PKCS#8"):
        signing.load_private_key(km.COSIGN_SEC1_INSIDE.encode(), "k", lambda: b"hello")


# --- keys we write ---------------------------------------------------------------------------

def _body(pem: bytes) -> dict:  # type: ignore[type-arg]
    lines = pem.decode().strip().splitlines()
    return json.loads(base64.b64decode("".join(lines[1:-1])))  # type: ignore[no-any-return]


def _rewrap(doc: dict) -> bytes:  # type: ignore[type-arg]
    body = base64.b64encode(json.dumps(doc).encode()).decode()
    return (f"-----BEGIN {signing.ENCRYPTED_LABELS[0]}-----\n{body}\n"
            f"-----END {signing.ENCRYPTED_LABELS[0]}-----\n").encode()


def test_written_key_has_cosign_format_and_round_trips() -> None:
    key = signing.generate("ecdsa-p256")
    pem = signing.encrypt_private_key(key, b"pw")
    assert pem.startswith(b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    assert all(len(line) <= 64 for line in pem.splitlines())
    doc = _body(pem)
    assert doc["kdf"]["name"] == "scrypt" and doc["kdf"]["params"] == {"N": 65536, "r": 8, "p": 1}
    assert len(base64.b64decode(doc["kdf"]["salt"])) == 32
    assert doc["cipher"]["name"] == "nacl/secretbox"
    assert len(base64.b64decode(doc["cipher"]["nonce"])) == 24
    back = signing.load_private_key(pem, "k", lambda: b"pw")
    assert keys.key_fingerprint(back.public_key()) == keys.key_fingerprint(key.public_key())


def test_written_key_plaintext_is_pkcs8_der() -> None:
    # decrypt with nothing but hashlib + PyNaCl, as any other implementation would
    import hashlib

    from nacl.secret import SecretBox

    key = signing.generate("ed25519")
    doc = _body(signing.encrypt_private_key(key, b""))
    box = hashlib.scrypt(b"", salt=base64.b64decode(doc["kdf"]["salt"]), n=65536, r=8, p=1,
                         dklen=32, maxmem=256 << 20)
    der = SecretBox(box).decrypt(base64.b64decode(doc["ciphertext"]),
                                 base64.b64decode(doc["cipher"]["nonce"]))
    assert der == signing.pkcs8_der(key)


@pytest.mark.parametrize("params", [{"N": 16384, "r": 8, "p": 1}, {"N": 65536, "r": 16, "p": 1},
                                    {"N": 1 << 30, "r": 8, "p": 1}, {"N": 65536, "r": 8, "p": 2}])
def test_scrypt_parameters_outside_cosigns_sets_are_refused(params: dict) -> None:  # type: ignore[type-arg]
    doc = _body(signing.encrypt_private_key(signing.generate(), b"pw"))
    doc["kdf"]["params"] = params
    with pytest.raises(MalformedInput, match="scrypt parameters"):
        signing.load_private_key(_rewrap(doc), "k", lambda: b"pw")


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("ciphertext"),
    lambda d: d["cipher"].update(name="aes-gcm"),
    lambda d: d["cipher"].update(nonce="AAAA"),
    lambda d: d.update(ciphertext="!!"),
])
def test_malformed_encrypted_keys(mutate) -> None:  # type: ignore[no-untyped-def]
    doc = _body(signing.encrypt_private_key(signing.generate(), b"pw"))
    mutate(doc)
    with pytest.raises(MalformedInput):
        signing.load_private_key(_rewrap(doc), "k", lambda: b"pw")


def test_tampered_ciphertext_fails_authentication() -> None:
    doc = _body(signing.encrypt_private_key(signing.generate(), b"pw"))
    ct = bytearray(base64.b64decode(doc["ciphertext"]))
    ct[-1] ^= 1
    doc["ciphertext"] = base64.b64encode(bytes(ct)).decode()
    with pytest.raises(signing.WrongPassword):
        signing.load_private_key(_rewrap(doc), "k", lambda: b"pw")


@pytest.mark.parametrize("name", list(km.SPECS))
def test_plain_pem_keys_sign_what_openssl_verifies(keyset: Dict[str, km.KeyFiles], blob: Path,
                                                   tmp_path: Path, name: str) -> None:
    kf = keyset[name]
    key = signing.load_private_key(kf.priv_pem.read_bytes(), str(kf.priv_pem), None)
    with Artifact.open(str(blob)) as art:
        raw = signing.sign_artifact(key, art)
    assert km.openssl_verify(kf, raw, blob, tmp_path)


@pytest.mark.parametrize("name, label", [("ecdsa-p256", b"EC PRIVATE KEY"),
                                         ("rsa-2048", b"RSA PRIVATE KEY")])
def test_traditional_pem_labels_load(keyset: Dict[str, km.KeyFiles], tmp_path: Path, name: str,
                                     label: bytes) -> None:
    trad = km.run("openssl", "pkey", "-in", str(keyset[name].priv_pem), "-traditional")
    assert label in trad
    key = signing.load_private_key(trad, "k", None)
    pub = keys.load_public_key(str(keyset[name].pub_pem))
    assert keys.key_fingerprint(key.public_key()) == pub.fingerprint


def test_public_key_or_garbage_is_not_a_private_key(keyset: Dict[str, km.KeyFiles]) -> None:
    with pytest.raises(MalformedInput, match="public key"):
        signing.load_private_key(keyset["ecdsa-p256"].pub_pem.read_bytes(), "k", None)
    with pytest.raises(MalformedInput, match="no BEGIN"):
        signing.load_private_key(b"hello", "k", None)
    with pytest.raises(MalformedInput, match="no password"):
        signing.load_private_key(km.COSIGN_SIGSTORE_LABEL.encode(), "k", None)


def test_unsupported_curve_is_refused() -> None:
    from cryptography.hazmat.primitives import serialization

    pem = ec.generate_private_key(ec.SECP256K1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with pytest.raises(MalformedInput, match="curve"):
        signing.load_private_key(pem, "k", None)


def test_write_file_refuses_to_clobber_and_sets_mode(tmp_path: Path) -> None:
    target = tmp_path / "x.key"
    old = os.umask(0)
    try:
        signing.write_file(str(target), b"secret", 0o600, force=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        signing.write_file(str(target), b"other", 0o600, force=False)
    assert target.read_bytes() == b"secret"
    signing.write_file(str(target), b"other", 0o600, force=True)
    assert target.read_bytes() == b"other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.key"]  # no temp files left


def test_password_comes_from_env_or_two_matching_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.cli import keys_cmd
    from agent.errors import ExecguardError

    monkeypatch.setenv("COSIGN_PASSWORD", "")
    assert keys_cmd._new_password() == b""  # set but empty: the empty password, no prompt
    monkeypatch.delenv("COSIGN_PASSWORD")
    answers = iter(["one", "two"])
    monkeypatch.setattr(keys_cmd.getpass, "getpass", lambda prompt: next(answers))
    with pytest.raises(ExecguardError, match="do not match"):
        keys_cmd._new_password()
    answers = iter(["same", "same"])
    assert keys_cmd._new_password() == b"same"
