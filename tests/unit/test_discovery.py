"""Signature discovery and the verification facade: where signatures are looked for, how
odd files are handled without hanging or crashing, and which failure is reported."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Dict, Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

import agent.verify as facade
from agent.digest import Artifact
from agent.errors import InputError, Reason
from agent.verify import discovery, keys, verify_artifact
from agent.verify.bundle import build_key_bundle
from agent.verify.model import SignatureKind, TrustConfig, Verdict
from tests import keymaterial as km


@pytest.fixture(scope="module")
def keyset(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, km.KeyFiles]:
    return km.generate_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture()
def blob(tmp_path: Path) -> Path:
    p = tmp_path / "bin" / "tool"
    p.parent.mkdir()
    p.write_bytes(b"tool contents " * 1000)
    return p


@pytest.fixture()
def art(blob: Path) -> Iterator[Artifact]:
    with Artifact.open(str(blob)) as a:
        yield a


def good_sig(keyset: Dict[str, km.KeyFiles], path: Path) -> bytes:
    return base64.b64encode(km.openssl_sign(keyset["ecdsa-p256"], path))


def trust(keyset: Dict[str, km.KeyFiles], *stores: Path) -> TrustConfig:
    k = keys.load_public_key(str(keyset["ecdsa-p256"].pub_pem))
    return TrustConfig(keys=(k,), store_dirs=tuple(str(s) for s in stores))


def test_sig_beside_the_file(keyset: Dict[str, km.KeyFiles], blob: Path, art: Artifact) -> None:
    Path(str(blob) + ".sig").write_bytes(good_sig(keyset, blob))
    v = verify_artifact(art, trust(keyset))
    assert v.trusted and v.evidence is not None
    assert v.evidence.source == str(blob) + ".sig"
    assert len(v.attempts) == 1


def test_store_keyed_by_sha256(keyset: Dict[str, km.KeyFiles], blob: Path, art: Artifact,
                               tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / (art.sha256.hex() + ".sig")).write_bytes(good_sig(keyset, blob))
    v = verify_artifact(art, trust(keyset, tmp_path / "missing-store", store))
    assert v.trusted
    assert v.evidence is not None and v.evidence.source == str(store / (art.sha256.hex() + ".sig"))


def test_symlink_in_store_is_refused(keyset: Dict[str, km.KeyFiles], blob: Path, art: Artifact,
                                     tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    real = tmp_path / "elsewhere.sig"
    real.write_bytes(good_sig(keyset, blob))
    (store / (art.sha256.hex() + ".sig")).symlink_to(real)
    v = verify_artifact(art, trust(keyset, store))
    assert not v.trusted and v.reason is Reason.MALFORMED_SIGNATURE
    assert "symlink" in v.detail


def test_one_bad_candidate_does_not_hide_a_good_one(keyset: Dict[str, km.KeyFiles], blob: Path,
                                                    art: Artifact, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    Path(str(blob) + ".sig").write_bytes(b"garbage")
    (store / (art.sha256.hex() + ".sig")).write_bytes(good_sig(keyset, blob))
    v = verify_artifact(art, trust(keyset, store))
    assert v.trusted
    assert [a.reason for a in v.attempts] == [Reason.MALFORMED_SIGNATURE, Reason.OK]


def test_fifo_directory_and_oversized_files_never_hang_or_crash(
        keyset: Dict[str, km.KeyFiles], blob: Path, art: Artifact) -> None:
    os.mkfifo(str(blob) + ".sig")
    os.mkdir(str(blob) + ".sigstore.json")
    Path(str(blob) + ".bundle").write_bytes(b"{" + b" " * discovery.MAX_SIGNATURE_FILE + b"}")
    v = verify_artifact(art, trust(keyset))
    assert not v.trusted and v.reason is Reason.MALFORMED_SIGNATURE
    details = [a.detail for a in v.attempts]
    assert "not a regular file" in details[0]
    assert "directory" in details[1]
    assert "limit" in details[2]


def test_explicit_signature_overrides_discovery(keyset: Dict[str, km.KeyFiles], blob: Path,
                                                art: Artifact, tmp_path: Path) -> None:
    Path(str(blob) + ".sig").write_bytes(b"garbage")
    explicit = tmp_path / "elsewhere.sig"
    explicit.write_bytes(good_sig(keyset, blob))
    v = verify_artifact(art, trust(keyset), signature_path=str(explicit))
    assert v.trusted and len(v.attempts) == 1


def test_explicit_missing_or_directory_is_an_input_error(keyset: Dict[str, km.KeyFiles],
                                                         art: Artifact, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        verify_artifact(art, trust(keyset), signature_path=str(tmp_path / "nope.sig"))
    with pytest.raises(InputError, match="directory"):
        verify_artifact(art, trust(keyset), bundle_path=str(tmp_path))


def test_nothing_found_is_no_signature_naming_the_places(keyset: Dict[str, km.KeyFiles],
                                                         blob: Path, art: Artifact,
                                                         tmp_path: Path) -> None:
    v = verify_artifact(art, trust(keyset, tmp_path))
    assert v.reason is Reason.NO_SIGNATURE and v.attempts == ()
    assert str(blob) + ".sig" in v.detail and art.sha256.hex() + ".bundle" in v.detail


def test_most_informative_failure_wins(keyset: Dict[str, km.KeyFiles], blob: Path,
                                       art: Artifact) -> None:
    other = blob.parent / "other"
    other.write_bytes(b"other")
    Path(str(blob) + ".sig").write_bytes(good_sig(keyset, other))  # bad-signature
    stranger = ec.generate_private_key(ec.SECP256R1())  # a real bundle by an unknown key
    sig = stranger.sign(art.sha256, ec.ECDSA(Prehashed(hashes.SHA256())))
    bundle = Path(str(blob) + ".sigstore.json")
    bundle.write_bytes(build_key_bundle(art.sha256, sig, stranger.public_key()))
    v = verify_artifact(art, trust(keyset))
    assert v.reason is Reason.UNTRUSTED_KEY
    assert [a.reason for a in v.attempts] == [Reason.BAD_SIGNATURE, Reason.UNTRUSTED_KEY]
    assert v.evidence is not None and v.evidence.kind is SignatureKind.BUNDLE_KEY
    assert v.evidence.source == str(bundle)


def test_unreadable_artifact_propagates(keyset: Dict[str, km.KeyFiles], blob: Path) -> None:
    a = Artifact.open(str(blob))
    os.close(a.fd)  # simulate an I/O failure on the artifact's own descriptor
    with pytest.raises(InputError):
        verify_artifact(a, trust(keyset))
    a.fd = -1


def test_a_verifier_bug_fails_closed(keyset: Dict[str, km.KeyFiles], blob: Path, art: Artifact,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    Path(str(blob) + ".sigstore.json").write_bytes(b"{}")

    def broken(a: Artifact, data: bytes, source: str, t: TrustConfig) -> Verdict:
        raise KeyError("boom")

    monkeypatch.setattr(facade, "verify_bundle", broken)  # fault injection: a verifier bug
    v = verify_artifact(art, trust(keyset))
    assert not v.trusted and v.reason is Reason.MALFORMED_SIGNATURE
    assert "verifier failed: KeyError" in v.detail
