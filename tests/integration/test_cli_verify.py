"""The ``verify``, ``keygen`` and ``sign`` contract, run as a subprocess on a real Go binary,
with OpenSSL as the independent signer/verifier."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

from tests import keymaterial as km

ENTRY = [sys.executable, "-m", "agent"]  # the installed package's real entry point


def eg(*args: str, password: str | None = None, cwd: Path | None = None
       ) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    env = {k: v for k, v in os.environ.items() if k != "COSIGN_PASSWORD"}
    if password is not None:
        env["COSIGN_PASSWORD"] = password
    return subprocess.run([*ENTRY, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, stdin=subprocess.DEVNULL, timeout=60)


@pytest.fixture(scope="module")
def gobin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("gosrc")
    (src / "go.mod").write_text("module example.com/hello\n\ngo 1.19\n")
    (src / "main.go").write_text('package main\n\nimport "fmt"\n\n'
                                 'func main() { fmt.Println("hello") }\n')
    env = dict(os.environ, GOCACHE=str(src / "cache"), GOPATH=str(src / "gopath"),
               GOFLAGS="-mod=mod", GOPROXY="off", CGO_ENABLED="0")
    subprocess.run(["/usr/bin/go", "build", "-o", str(src / "hello"), "."], cwd=src, env=env,
                   check=True, capture_output=True, timeout=120)
    return src / "hello"


@pytest.fixture(scope="module")
def keyset(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, km.KeyFiles]:
    return km.generate_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture()
def binary(gobin: Path, tmp_path: Path) -> Path:
    p = tmp_path / "hello"
    shutil.copy2(gobin, p)
    return p


def openssl_sig(kf: km.KeyFiles, binary: Path) -> Path:
    sig = Path(str(binary) + ".sig")
    sig.write_bytes(base64.b64encode(km.openssl_sign(kf, binary)))
    return sig


def verify_json(*args: str) -> Dict[str, Any]:
    r = eg("verify", "--json", *args)
    out: Dict[str, Any] = json.loads(r.stdout)
    out["_rc"] = r.returncode
    return out


@pytest.mark.parametrize("name", ["ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "rsa-4096",
                                  "ed25519"])
def test_openssl_signed_go_binary_is_trusted(keyset: Dict[str, km.KeyFiles], binary: Path,
                                             name: str) -> None:
    openssl_sig(keyset[name], binary)
    r = eg("verify", str(binary), "--key", str(keyset[name].pub_pem))
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stdout.startswith(f"TRUSTED  {binary}  cosign-sig by sha256:")
    assert "reason: ok" in r.stdout


def test_json_output_contract(keyset: Dict[str, km.KeyFiles], binary: Path) -> None:
    sig = openssl_sig(keyset["ecdsa-p256"], binary)
    out = verify_json(str(binary), "--key", str(keyset["ecdsa-p256"].pub_pem))
    assert out["_rc"] == 0
    assert set(out) == {"_rc", "file", "sha256", "size", "verdict", "reason", "detail",
                        "signature", "attempts", "go"}
    assert out["verdict"] == "trusted" and out["reason"] == "ok"
    assert out["size"] == binary.stat().st_size and len(out["sha256"]) == 64
    assert out["signature"]["kind"] == "cosign-sig" and out["signature"]["source"] == str(sig)
    assert out["signature"]["key_fingerprint"].startswith("sha256:")
    assert out["attempts"] == [{"source": str(sig), "kind": "cosign-sig", "reason": "ok",
                                "detail": out["detail"]}]
    go = out["go"]
    if importlib.util.find_spec("agent.goinfo.buildinfo") is not None:
        assert isinstance(go, dict) and "example.com/hello" in json.dumps(go)
    else:
        assert go is None


def test_json_go_is_null_for_a_non_go_file(tmp_path: Path) -> None:
    f = tmp_path / "script.sh"
    f.write_text("#!/bin/sh\necho hi\n")
    out = verify_json(str(f))
    assert out["_rc"] == 1 and out["go"] is None and out["reason"] == "no-signature"


def _tamper(binary: Path, sig: Path, keyset: Dict[str, km.KeyFiles]) -> None:
    with open(binary, "ab") as fh:
        fh.write(b"\0")


def _wrong_key_sig(binary: Path, sig: Path, keyset: Dict[str, km.KeyFiles]) -> None:
    sig.write_bytes(base64.b64encode(km.openssl_sign(keyset["rsa-2048"], binary)))


def _other_file_sig(binary: Path, sig: Path, keyset: Dict[str, km.KeyFiles]) -> None:
    other = binary.parent / "other"
    other.write_bytes(b"some other file")
    sig.write_bytes(base64.b64encode(km.openssl_sign(keyset["ecdsa-p256"], other)))


def _truncate(binary: Path, sig: Path, keyset: Dict[str, km.KeyFiles]) -> None:
    raw = base64.b64decode(sig.read_bytes())
    sig.write_bytes(base64.b64encode(raw[: len(raw) // 2]))


@pytest.mark.parametrize("damage, reason", [
    (_tamper, "bad-signature"),
    (_other_file_sig, "bad-signature"),
    (_wrong_key_sig, "untrusted-key"),  # an RSA signature, only an ECDSA key trusted
    (_truncate, "malformed-signature"),
    (lambda b, s, k: s.write_bytes(b""), "malformed-signature"),
    (lambda b, s, k: s.write_bytes(b"\x00garbage\xff" * 9), "malformed-signature"),
])
def test_negative_controls_are_untrusted_with_a_reason(keyset: Dict[str, km.KeyFiles],
                                                       binary: Path, damage: Any,
                                                       reason: str) -> None:
    sig = openssl_sig(keyset["ecdsa-p256"], binary)
    damage(binary, sig, keyset)
    out = verify_json(str(binary), "--key", str(keyset["ecdsa-p256"].pub_pem))
    assert out["_rc"] == 1 and out["verdict"] == "untrusted"
    assert out["reason"] == reason, out["detail"]
    r = eg("verify", str(binary), "--key", str(keyset["ecdsa-p256"].pub_pem))
    assert r.returncode == 1 and r.stdout.startswith("UNTRUSTED")
    assert f"reason: {reason}" in r.stdout and f"  {sig}: {reason}" in r.stdout


def test_same_type_wrong_key_is_bad_signature(keyset: Dict[str, km.KeyFiles],
                                              binary: Path, tmp_path: Path) -> None:
    openssl_sig(keyset["ecdsa-p256"], binary)
    other = km.generate_keys(tmp_path / "other")  # another P-256 key among others
    out = verify_json(str(binary), "--key", str(other["ecdsa-p256"].pub_pem))
    assert out["_rc"] == 1 and out["reason"] == "bad-signature"


@pytest.mark.parametrize("args, fragment", [
    (["{missing}"], "No such file"),
    (["{dir}"], "is a directory"),
    (["{bin}", "--key", "{priv}"], "is a private key"),
    (["{bin}", "--key", "{txt}"], "not a PEM public key"),
    (["{bin}", "--key", "{bin}"], "not a public key"),
    (["{bin}", "--key", "{missing}"], "No such file"),
    (["{bin}", "--signature", "{missing}"], "no such file"),
    (["{bin}", "--identity", "a@b.c"], "--issuer"),
    (["{bin}", "--issuer", "https://accounts.google.com"], "--identity"),
    (["{bin}", "--identity", "x", "--identity-regex", "y", "--issuer", "i"], "exclusive"),
    (["{bin}", "--store", "{missing}"], "does not exist"),
    (["{bin}", "--trusted-root", "{bin}"], "not JSON"),
])
def test_usage_and_io_errors_exit_2(keyset: Dict[str, km.KeyFiles], binary: Path,
                                    tmp_path: Path, args: List[str], fragment: str) -> None:
    (tmp_path / "notes.txt").write_text("not a key\n")
    fill = {"missing": str(tmp_path / "missing"), "dir": str(tmp_path), "bin": str(binary),
            "priv": str(keyset["ecdsa-p256"].priv_pem), "txt": str(tmp_path / "notes.txt")}
    argv = [a.format(**fill) for a in args]
    r = eg("verify", *argv)
    assert r.returncode == 2 and fragment in r.stderr, r.stderr
    r = eg("verify", "--json", *argv)
    assert r.returncode == 2
    assert fragment in json.loads(r.stdout)["error"]


def test_store_directory_keyed_by_sha256(keyset: Dict[str, km.KeyFiles], binary: Path,
                                         tmp_path: Path) -> None:
    import hashlib

    store = tmp_path / "store"
    store.mkdir()
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()
    (store / f"{digest}.sig").write_bytes(base64.b64encode(
        km.openssl_sign(keyset["ed25519"], binary)))
    key = str(keyset["ed25519"].pub_pem)
    assert eg("verify", str(binary), "--key", key).returncode == 1
    assert eg("verify", str(binary), "--key", key, "--store", str(store)).returncode == 0


# --- keygen and sign --------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm, digest", [("ecdsa-p256", "sha256"), ("ecdsa-p384", "sha384"),
                                               ("ecdsa-p521", "sha512"), ("rsa-4096", "sha256"),
                                               ("ed25519", None)])
def test_keygen_sign_verify_round_trip_with_openssl(binary: Path, tmp_path: Path,
                                                    algorithm: str, digest: str | None
                                                    ) -> None:
    prefix = tmp_path / "signer"
    r = eg("keygen", "--output-prefix", str(prefix), "--algorithm", algorithm, password="s3cret")
    assert r.returncode == 0, r.stderr
    priv, pub = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    r = eg("sign", str(binary), "--key", str(priv), password="s3cret")
    assert r.returncode == 0, r.stderr
    sig = Path(f"{binary}.sig").read_bytes()
    assert not sig.endswith(b"\n")  # exactly what cosign sign-blob writes
    kf = km.KeyFiles(algorithm, priv, pub, digest)
    assert km.openssl_verify(kf, base64.b64decode(sig, validate=True), binary, tmp_path)
    assert eg("verify", str(binary), "--key", str(pub)).returncode == 0


def test_keygen_refuses_to_overwrite_and_supports_no_password(tmp_path: Path,
                                                              binary: Path) -> None:
    r = eg("keygen", password="", cwd=tmp_path)  # default prefix "cosign", empty password
    assert r.returncode == 0 and (tmp_path / "cosign.key").exists()
    before = (tmp_path / "cosign.key").read_bytes()
    r = eg("keygen", password="", cwd=tmp_path)
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (tmp_path / "cosign.key").read_bytes() == before
    r = eg("keygen", "--no-password", "--force", cwd=tmp_path)
    assert r.returncode == 0
    assert (tmp_path / "cosign.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    out = tmp_path / "custom.sig"
    r = eg("sign", str(binary), "--key", str(tmp_path / "cosign.key"),
           "--output-signature", str(out))
    assert r.returncode == 0, r.stderr
    r = eg("verify", str(binary), "--key", str(tmp_path / "cosign.pub"), "--signature", str(out))
    assert r.returncode == 0, r.stdout


def test_sign_with_a_cosign_made_key(binary: Path, tmp_path: Path) -> None:
    key = tmp_path / "cosign.key"
    key.write_text(km.COSIGN_LEGACY_LABEL)
    assert eg("sign", str(binary), "--key", str(key), password="wrong").returncode == 2
    r = eg("sign", str(binary), "--key", str(key), password="hello")
    assert r.returncode == 0, r.stderr
    from agent import signing

    priv = signing.load_private_key(key.read_bytes(), "k", lambda: b"hello")
    pub = tmp_path / "cosign.pub"
    pub.write_bytes(signing.public_pem(priv.public_key()))
    assert eg("verify", str(binary), "--key", str(pub)).returncode == 0


def test_sign_errors_exit_2(keyset: Dict[str, km.KeyFiles], binary: Path, tmp_path: Path) -> None:
    r = eg("sign", str(binary), "--key", str(keyset["ecdsa-p256"].pub_pem))
    assert r.returncode == 2 and "public key" in r.stderr
    r = eg("sign", str(tmp_path / "missing"), "--key", str(keyset["ecdsa-p256"].priv_pem))
    assert r.returncode == 2 and "missing" in r.stderr
    r = eg("sign", str(binary), "--key", str(tmp_path))
    assert r.returncode == 2 and "directory" in r.stderr


@pytest.mark.parametrize("name", sorted(km.SPECS))
def test_sign_bundle_verifies(keyset: Dict[str, km.KeyFiles], binary: Path, name: str) -> None:
    """--bundle writes the bundle instead of a .sig, its digest in the key's registry hash."""
    sig = Path(f"{binary}.sig")
    sig.unlink(missing_ok=True)
    r = eg("sign", str(binary), "--key", str(keyset[name].priv_pem), "--bundle")
    assert r.returncode == 0, r.stderr
    assert not sig.exists()
    bundle = Path(f"{binary}.sigstore.json")
    doc = json.loads(bundle.read_text())
    assert "verificationMaterial" in doc
    want = {"sha384": "SHA2_384", "sha512": "SHA2_512"}.get(keyset[name].digest, "SHA2_256")
    assert doc["messageSignature"]["messageDigest"]["algorithm"] == want
    out = verify_json(str(binary), "--key", str(keyset[name].pub_pem), "--bundle", str(bundle))
    assert out["_rc"] == 0, out
    assert out["signature"]["kind"] == "sigstore-bundle-key"


