"""cosign ``.sig`` verification: OpenSSL-made signatures verify, every broken input fails
with the right reason, and nothing raises for bad signature bytes."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Dict

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.digest import Artifact
from agent.errors import MalformedInput, Reason
from agent.verify import keys
from agent.verify.cosign_sig import classify, decode_signature, verify_sig
from agent.verify.model import SignatureKind, TrustConfig
from tests import keymaterial as km


@pytest.fixture(scope="module")
def keyset(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, km.KeyFiles]:
    return km.generate_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture()
def blob(tmp_path: Path) -> Path:
    p = tmp_path / "blob"
    p.write_bytes(b"\x7fELF pretend binary\n" + bytes(range(256)) * 50)
    return p


def trust_of(*files: km.KeyFiles) -> TrustConfig:
    return TrustConfig(keys=tuple(keys.load_public_key(str(f.pub_pem)) for f in files))


def check(path: Path, sig: bytes, trust: TrustConfig):  # type: ignore[no-untyped-def]
    with Artifact.open(str(path)) as art:
        return verify_sig(art, sig, str(path) + ".sig", trust)


@pytest.mark.parametrize("name", list(km.SPECS))
def test_openssl_signature_verifies(keyset: Dict[str, km.KeyFiles], blob: Path, name: str) -> None:
    kf = keyset[name]
    sig_b64 = base64.b64encode(km.openssl_sign(kf, blob))
    v = check(blob, sig_b64, trust_of(kf))
    assert v.trusted, v.detail
    assert v.reason is Reason.OK
    assert v.evidence is not None and v.evidence.kind is SignatureKind.COSIGN_SIG
    assert v.evidence.key_fingerprint == keys.key_fingerprint(
        keys.load_public_key(str(kf.pub_pem)).public_key)


@pytest.mark.parametrize("name", ["ecdsa-p256", "rsa-2048", "ed25519"])
def test_tampered_file_is_bad_signature(keyset: Dict[str, km.KeyFiles], blob: Path,
                                        name: str) -> None:
    kf = keyset[name]
    sig = base64.b64encode(km.openssl_sign(kf, blob))
    blob.write_bytes(blob.read_bytes() + b"\x00")
    v = check(blob, sig, trust_of(kf))
    assert not v.trusted and v.reason is Reason.BAD_SIGNATURE


def test_signature_for_another_file_is_bad_signature(keyset: Dict[str, km.KeyFiles],
                                                     blob: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"another file")
    sig = base64.b64encode(km.openssl_sign(keyset["ecdsa-p256"], other))
    assert check(blob, sig, trust_of(keyset["ecdsa-p256"])).reason is Reason.BAD_SIGNATURE


def test_wrong_key_of_same_type_is_bad_signature(keyset: Dict[str, km.KeyFiles],
                                                 blob: Path) -> None:
    priv = ec.generate_private_key(ec.SECP256R1())
    sig = base64.b64encode(priv.sign(blob.read_bytes(), ec.ECDSA(hashes.SHA256())))
    v = check(blob, sig, trust_of(keyset["ecdsa-p256"]))
    assert v.reason is Reason.BAD_SIGNATURE
    assert "another key" in v.detail


def test_signature_no_trusted_key_could_make_is_untrusted_key(
        keyset: Dict[str, km.KeyFiles], blob: Path) -> None:
    # Ed25519 signature, only ECDSA/RSA keys trusted: certainly someone else's key
    sig = base64.b64encode(km.openssl_sign(keyset["ed25519"], blob))
    v = check(blob, sig, trust_of(keyset["ecdsa-p256"], keyset["rsa-2048"]))
    assert v.reason is Reason.UNTRUSTED_KEY
    # a P-521 signature cannot come from a P-256 key
    sig = base64.b64encode(km.openssl_sign(keyset["ecdsa-p521"], blob))
    assert check(blob, sig, trust_of(keyset["ecdsa-p256"])).reason is Reason.UNTRUSTED_KEY
    # an RSA-4096 signature cannot come from an RSA-2048 key
    sig = base64.b64encode(km.openssl_sign(keyset["rsa-4096"], blob))
    assert check(blob, sig, trust_of(keyset["rsa-2048"])).reason is Reason.UNTRUSTED_KEY


def test_old_cosign_p384_sha256_signature_still_verifies(keyset: Dict[str, km.KeyFiles],
                                                         blob: Path) -> None:
    priv = keyset["ecdsa-p384"].private_key()
    sig = priv.sign(blob.read_bytes(), ec.ECDSA(hashes.SHA256()))
    assert check(blob, base64.b64encode(sig), trust_of(keyset["ecdsa-p384"])).trusted


def test_trailing_newline_whitespace_and_raw_der_accepted(keyset: Dict[str, km.KeyFiles],
                                                          blob: Path) -> None:
    kf = keyset["ecdsa-p256"]
    raw = km.openssl_sign(kf, blob)
    b64 = base64.b64encode(raw)
    for form in (b64 + b"\n", b"  " + b64 + b"\r\n", b64[:20] + b"\n" + b64[20:], raw):
        assert check(blob, form, trust_of(kf)).trusted, form


def test_any_of_several_keys(keyset: Dict[str, km.KeyFiles], blob: Path) -> None:
    sig = base64.b64encode(km.openssl_sign(keyset["ecdsa-p384"], blob))
    v = check(blob, sig, trust_of(keyset["ecdsa-p256"], keyset["rsa-2048"], keyset["ecdsa-p384"]))
    assert v.trusted
    assert "secp384r1" in v.detail


@pytest.mark.parametrize("data, fragment", [
    (b"", "empty"),
    (b"  \n\t", "empty"),
    (b"!!!not base64 and not DER!!!", "neither"),
    (base64.b64encode(b"\x30\x45\x02\x20" + b"\x01" * 20), "truncated"),
    (base64.b64encode(b"x" * 5000), "far above"),
    (base64.b64encode(b"\x01\x02\x03"), "neither"),
])
def test_malformed_signatures(keyset: Dict[str, km.KeyFiles], blob: Path, data: bytes,
                              fragment: str) -> None:
    v = check(blob, data, trust_of(keyset["ecdsa-p256"]))
    assert v.reason is Reason.MALFORMED_SIGNATURE, v.detail
    assert fragment in v.detail
    assert v.evidence is not None and v.evidence.source.endswith(".sig")


def test_truncated_real_signature_is_malformed(keyset: Dict[str, km.KeyFiles],
                                               blob: Path) -> None:
    raw = km.openssl_sign(keyset["ecdsa-p256"], blob)
    # every cut, including the one that leaves 64 bytes (the length of an Ed25519 signature)
    for cut in range(1, len(raw) - 8):
        v = check(blob, base64.b64encode(raw[:-cut]), trust_of(keyset["ecdsa-p256"]))
        assert v.reason is Reason.MALFORMED_SIGNATURE, (cut, v.detail)


def test_no_keys_is_no_trust_configured(keyset: Dict[str, km.KeyFiles], blob: Path) -> None:
    sig = base64.b64encode(km.openssl_sign(keyset["ecdsa-p256"], blob))
    assert check(blob, sig, TrustConfig()).reason is Reason.NO_TRUST_CONFIGURED


def test_der_parser_is_strict() -> None:
    assert classify(b"\x30\x06\x02\x01\x05\x02\x01\x07", "s").family == "ecdsa"
    with pytest.raises(MalformedInput):
        classify(b"\x30\x07\x02\x01\x05\x02\x01\x07\x00", "s")  # trailing byte inside
    with pytest.raises(MalformedInput):
        classify(b"\x30\x06\x02\x01\x85\x02\x01\x07", "s")  # negative r
    with pytest.raises(MalformedInput):
        classify(b"\x30\x07\x02\x02\x00\x05\x02\x01\x07", "s")  # non-minimal r


def test_decode_prefers_base64_and_caps_size() -> None:
    assert decode_signature(base64.b64encode(b"abc") + b"\n", "s") == b"abc"
    with pytest.raises(MalformedInput):
        decode_signature(b"\x30" * 8000, "s")  # "000…" is base64 too: 6000 bytes


def test_ed25519_signature_that_parses_as_der_is_still_tried(keyset: Dict[str, km.KeyFiles],
                                                             blob: Path) -> None:
    # 64 bytes that are also a valid DER ECDSA SEQUENCE: the Ed25519 key must still be tried,
    # and its failure is a bad signature, not "no key of that type".
    der_like = b"\x30\x3e\x02\x1d" + b"\x01" * 29 + b"\x02\x1d" + b"\x01" * 29
    assert len(der_like) == 64 and classify(der_like, "s").family == "ecdsa"
    v = check(blob, base64.b64encode(der_like), trust_of(keyset["ed25519"]))
    assert v.reason is Reason.BAD_SIGNATURE
