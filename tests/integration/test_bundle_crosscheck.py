"""``build_key_bundle`` output is accepted by execguard AND by sigstore-js @sigstore/verify;
and sigstore-js agrees with our verdicts on the npm-produced bundles."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from agent.errors import Reason
from agent.verify.bundle import build_key_bundle
from agent.verify.keys import parse_public_key
from agent.verify.model import TrustConfig
from tests.bundle_fixtures import JS_DIR, Generated, generated, verify_file


@pytest.fixture(scope="module")
def gen() -> Generated:
    return generated()


def js_verify(gen: Generated, bundle: Path, artifact: Path, key: Any = None) -> bool:
    node = shutil.which("node")
    assert node, "node is required"
    cmd = [node, str(JS_DIR / "verify.mjs"), str(gen.path("trusted_root.json")), str(bundle),
           str(artifact)] + ([str(key)] if key else [])
    proc = subprocess.run(cmd, cwd=JS_DIR, capture_output=True, text=True, timeout=60)
    return proc.returncode == 0


@pytest.mark.parametrize("kind", ["p256", "p384", "p521", "rsa"])
def test_build_key_bundle_accepted_by_both(gen: Generated, tmp_path: Path, kind: str) -> None:
    """Each key signs with its registry hash (P-384: SHA-384, P-521: SHA-512) as `sign` does."""
    if kind == "rsa":
        key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        curve = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1(), "p521": ec.SECP521R1()}[kind]
        key = ec.generate_private_key(curve)
    hash_name = {"p384": "sha384", "p521": "sha512"}.get(kind, "sha256")
    algo = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(),
            "sha512": hashes.SHA512()}[hash_name]
    digest = hashlib.new(hash_name, gen.hello.read_bytes()).digest()
    if kind == "rsa":
        sig = key.sign(digest, padding.PKCS1v15(), Prehashed(algo))
    else:
        sig = key.sign(digest, ec.ECDSA(Prehashed(algo)))
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "k.pub").write_bytes(pem)
    bundle = tmp_path / "hello.sigstore.json"
    bundle.write_bytes(build_key_bundle(digest, sig, key.public_key(), hash_name))
    trust = TrustConfig(keys=(parse_public_key(pem, "k.pub"),))
    verdict = verify_file(gen.hello, bundle.read_bytes(), str(bundle), trust)
    assert verdict.trusted, verdict.detail
    assert js_verify(gen, bundle, gen.hello, tmp_path / "k.pub")
    # and both refuse it for another binary
    assert verify_file(gen.other, bundle.read_bytes(), "b", trust).reason == \
        Reason.DIGEST_MISMATCH
    assert not js_verify(gen, bundle, gen.other, tmp_path / "k.pub")


@pytest.mark.parametrize("name,ok", [("keyless-v0.2.json", True), ("keyless-v0.3.json", True),
                                     ("keyless-v0.2-pem-oneline.json", True),
                                     ("keyless-other-artifact.json", False)])
def test_sigstore_js_agrees(gen: Generated, name: str, ok: bool) -> None:
    assert js_verify(gen, gen.path(name), gen.hello) is ok
    assert verify_file(gen.hello, gen.read(name), name, gen.trust()).trusted is ok
