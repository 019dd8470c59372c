"""Key material for the signing and verification tests.

Keys are made fresh per session, mostly by the OpenSSL CLI so that key generation is not
our own code. OpenSSL is also the independent peer that signs and verifies ``.sig`` files
(cosign cannot be installed here). The encrypted keys at the bottom were produced by cosign
itself and published in its test suites: they pin our decryption to the real format.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

# name -> (openssl genpkey arguments or None for cryptography, digest cosign uses; None = pure)
SPECS: Dict[str, Any] = {
    "ecdsa-p256": (["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"], "sha256"),
    "ecdsa-p384": (["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"], "sha384"),
    "ecdsa-p521": (["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"], "sha512"),
    "rsa-2048": (["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"], "sha256"),
    "rsa-4096": (None, "sha256"),
    "ed25519": (["-algorithm", "ed25519"], None),
}


@dataclass(frozen=True)
class KeyFiles:
    name: str
    priv_pem: Path  # unencrypted PKCS#8 PEM
    pub_pem: Path  # SubjectPublicKeyInfo PEM
    digest: str | None  # openssl dgst name; None for Ed25519 (signs the message itself)

    def private_key(self) -> Any:
        return serialization.load_pem_private_key(self.priv_pem.read_bytes(), password=None)


def run(*cmd: str, data: bytes | None = None) -> bytes:
    return subprocess.run(cmd, input=data, check=True, capture_output=True).stdout


def generate_keys(directory: Path) -> Dict[str, KeyFiles]:
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (genpkey, digest) in SPECS.items():
        priv, pub = directory / f"{name}.pem", directory / f"{name}.pub"
        if genpkey is None:
            key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
            priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        else:
            run("openssl", "genpkey", *genpkey, "-out", str(priv))
        run("openssl", "pkey", "-in", str(priv), "-pubout", "-out", str(pub))
        out[name] = KeyFiles(name, priv, pub, digest)
    return out


def openssl_sign(kf: KeyFiles, path: Path) -> bytes:
    """The raw signature OpenSSL makes over the file's bytes (what cosign's .sig encodes)."""
    if kf.digest is None:
        return run("openssl", "pkeyutl", "-sign", "-rawin", "-inkey", str(kf.priv_pem),
                   "-in", str(path))
    return run("openssl", "dgst", f"-{kf.digest}", "-sign", str(kf.priv_pem), str(path))


def openssl_verify(kf: KeyFiles, signature: bytes, path: Path, workdir: Path) -> bool:
    sig = workdir / f"{path.name}.{kf.name}.der"
    sig.write_bytes(signature)
    if kf.digest is None:
        cmd = ["openssl", "pkeyutl", "-verify", "-rawin", "-pubin", "-inkey", str(kf.pub_pem),
               "-in", str(path), "-sigfile", str(sig)]
    else:
        cmd = ["openssl", "dgst", f"-{kf.digest}", "-verify", str(kf.pub_pem),
               "-signature", str(sig), str(path)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


# --- cosign-produced encrypted keys (test data, password "hello" unless noted) -------------
# From sigstore/cosign pkg/cosign/keys_test.go (commit 11671a73744069f05c3f706700b35be1162080ee),
# constant `pemsigstorekey`: current label, scrypt N=32768, PKCS#8 ECDSA P-256 inside.
COSIGN_SIGSTORE_LABEL = """-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----
eyJrZGYiOnsibmFtZSI6InNjcnlwdCIsInBhcmFtcyI6eyJOIjozMjc2OCwiciI6
OCwicCI6MX0sInNhbHQiOiI3T3VGd2VsbWZZNXVId2NoaURSc210anNwZ2ZlZjFG
Mk5lOGFDTjVLYVpZPSJ9LCJjaXBoZXIiOnsibmFtZSI6Im5hY2wvc2VjcmV0Ym94
Iiwibm9uY2UiOiJQNHk4OGhCb3ZTa09MbXN0bFVBaGJwdDJ0K2xTNUxQSCJ9LCJj
aXBoZXJ0ZXh0IjoiMnB1QzdyZldJOWh3bnJlQ2s4aUZDRlVwQlRrSzRJNlIvbFBF
cnBDekpXUGpJWXl4eGVIL1A2VW52cFJHdVhla1NNb3JMdGhLamdoQ1JlNy82NDVH
QWtoVm1LRC92eEF0S2EvbE1abENSQ3FlekJGUFd1dzNpeFRtZ2xhb2J1ZFVSbUVs
bmNGOGlZbzBTMVl6Y1ZOMVFwY2J2c0dNcUlYRzVlbmdteGp5dCtBcXlyZTF0Q0Y0
V01tU1BlaEljNlBqd2h1Q2xHaVpJUWRvTGc9PSJ9
-----END ENCRYPTED SIGSTORE PRIVATE KEY-----
"""

# Same file, constant `pemcosignkey`: legacy label, N=32768; cosign loads it.
COSIGN_LEGACY_LABEL = """-----BEGIN ENCRYPTED COSIGN PRIVATE KEY-----
eyJrZGYiOnsibmFtZSI6InNjcnlwdCIsInBhcmFtcyI6eyJOIjozMjc2OCwiciI6
OCwicCI6MX0sInNhbHQiOiJ4WWdoc09JTUxUWGNOT0RsclNIOUNKc1FlOVFnZmN1
cmUrMXlLdHh1TlkwPSJ9LCJjaXBoZXIiOnsibmFtZSI6Im5hY2wvc2VjcmV0Ym94
Iiwibm9uY2UiOiI0cS9PSlVmaXJkSUkrUjZ0ajZBMmcyQ0JqL25xdFNicCJ9LCJj
aXBoZXJ0ZXh0IjoiKzB4Q3NzcFN0WStBczdKanJpOWtsbHBWd2JhcUI4ZWJNdWto
eS9aVE1MSXRsL3B1YS9jWVJvbytLRGxMWWdmOW1kSjk4K1FnQW9oTktoYnJPMTcw
MHdBY1JTMjFDOE4zQUNJRUVZaWpOMllBNnMraGJSbkhjUnd4eGhDMDFtb2FvL0dO
Y1pmbEJheXZMV3pXblo4d2NDZ2ZpT1o1VXlRTEFJMHh0dnR6dEh3cTdDV1Vhd3V4
RlhlNDZzck9TUE9SNHN6bytabWErUGovSFE9PSJ9
-----END ENCRYPTED COSIGN PRIVATE KEY-----
"""

# Same file, constant `pemcosigneckey`: N=65536, but the plaintext is a SEC1 EC key, which
# cosign refuses ("use ParseECPrivateKey instead"); so must we.
COSIGN_SEC1_INSIDE = """-----BEGIN ENCRYPTED COSIGN PRIVATE KEY-----
eyJrZGYiOnsibmFtZSI6InNjcnlwdCIsInBhcmFtcyI6eyJOIjo2NTUzNiwiciI6
OCwicCI6MX0sInNhbHQiOiJHK3F5WTYrNzhNS0JzMXNGTGs1ajYwcS9kS3Z1czBW
VkhlSHZybC9POTF3PSJ9LCJjaXBoZXIiOnsibmFtZSI6Im5hY2wvc2VjcmV0Ym94
Iiwibm9uY2UiOiJRc2JGdG13WDRDK2ttV3ZCcVRaMEFGOUFYdk1jRmg1SCJ9LCJj
aXBoZXJ0ZXh0IjoiREM5T28zeldiYVQzSXYwdFVnWEdycjUxYW1samwwNlQ5MTNP
VkxPbWpuMWhnK2o2WXRUbWg3SGhZSlY1N2J5eGE0Q281bE9YYmRqbTJ3aklubEd1
Um5aZCt5OExnekpSNzFSeEhKVzgrWmRlcFJmYWJMTjdHbDgrSFZEcERVQ3NxQnRh
VngyblpGbFEwWUl1anZwbFphblNGaUVvdERLVGkxZ3VhUXIwUHNzYU01NXZxbTRY
WS9rPSJ9
-----END ENCRYPTED COSIGN PRIVATE KEY-----
"""

# From sigstore/sigstore-rs tests/data/keys/cosign_generated_encrypted_empty_private.key
# (commit f7828d20eef7854c3e83b5ed2c67988334c358af): made by `cosign generate-key-pair`
# with the EMPTY password, N=65536 (today's default).
COSIGN_EMPTY_PASSWORD = """-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----
eyJrZGYiOnsibmFtZSI6InNjcnlwdCIsInBhcmFtcyI6eyJOIjo2NTUzNiwiciI6
OCwicCI6MX0sInNhbHQiOiJFY3pJR3Z0bnpFcCsxaEpudERnbGI1UnoxN3gwQVMy
YklvWGRNcDQrU1NJPSJ9LCJjaXBoZXIiOnsibmFtZSI6Im5hY2wvc2VjcmV0Ym94
Iiwibm9uY2UiOiJtSVVKbG1OMzNINExvZ0dhaG5MamdmK3R4SmJwci93MCJ9LCJj
aXBoZXJ0ZXh0IjoiM3FtS2FidXRuYm1WT1IvTkZGM2NDaUErTXp1WWQ5L0VERDVI
MVlUSGhQVzZsSzAvdjVqdDZCQzlsME12NGV5am9qZkl0d3B6a2JJOXQrZGx5VXZ3
VUgvMWZjbkFZT2dEdXRLQzkvSkNiOE02SVY2VHpVaDF5c0ZFWDFzeG9xb1FzeUpL
bjM0UVlldFNlaVdDaGtmUHUyZXByQjFEV0pwekdzTGZIakxNVTkzOEdmNk1xM1A0
N0ZSd2syZzY1cFZnSGMwVWV1L1N1OUs0Zmc9PSJ9
-----END ENCRYPTED SIGSTORE PRIVATE KEY-----
"""
