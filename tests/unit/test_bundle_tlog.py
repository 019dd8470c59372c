"""tlog.py: RFC 6962 inclusion proofs against a reference tree, signed checkpoints, SET bytes."""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timezone
from typing import Any, Dict, List, Tuple

import pytest
import rfc8785
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.verify.tlog import (
    InclusionProof,
    TlogError,
    merkle_root,
    set_payload,
    verify_checkpoint,
)
from agent.verify.trusted_root import LogKey


def leaf(i: int) -> bytes:
    return hashlib.sha256(b"\x00" + str(i).encode()).digest()


def mth(leaves: List[bytes]) -> bytes:
    """RFC 6962 §2.1 Merkle tree hash, straight from the definition."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def path(m: int, leaves: List[bytes]) -> Tuple[bytes, ...]:
    """RFC 6962 §2.1.1 audit path PATH(m, D[n])."""
    if len(leaves) == 1:
        return ()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    if m < k:
        return (*path(m, leaves[:k]), mth(leaves[k:]))
    return (*path(m - k, leaves[k:]), mth(leaves[:k]))


@pytest.mark.parametrize("size", range(1, 12))
def test_inclusion_proofs_for_every_leaf(size: int) -> None:
    leaves = [leaf(i) for i in range(size)]
    root = mth(leaves)
    for m in range(size):
        assert merkle_root(m, size, leaves[m], path(m, leaves)) == root
        if size > 1:
            wrong = leaves[(m + 1) % size]
            assert merkle_root(m, size, wrong, path(m, leaves)) != root


def test_bad_proof_shapes() -> None:
    leaves = [leaf(i) for i in range(5)]
    with pytest.raises(TlogError):
        merkle_root(5, 5, leaves[0], path(0, leaves))
    with pytest.raises(TlogError):
        merkle_root(0, 5, leaves[0], path(0, leaves)[:-1])
    with pytest.raises(TlogError):
        merkle_root(0, 5, leaves[0], (*path(0, leaves), b"x" * 32))


def test_set_payload_is_rfc8785() -> None:
    fields: Dict[str, Any] = {"body": "eyJh+/==", "integratedTime": 1700000000, "logID": "c0d2ff",
              "logIndex": 123}
    assert set_payload("eyJh+/==", 1700000000, "c0d2ff", 123) == rfc8785.dumps(fields)


def _note(key: ec.EllipticCurvePrivateKey, key_id: bytes, root: bytes, size: int,
          witness_first: bool = False) -> str:
    body = f"log.example - 42\n{size}\n{base64.b64encode(root).decode()}\nTimestamp: 1\n"
    sig = key.sign(body.encode(), ec.ECDSA(hashes.SHA256()))
    own = f"\u2014 log.example {base64.b64encode(key_id[:4] + sig).decode()}"
    witness = f"\u2014 witness {base64.b64encode(b'wxyz' + b'sig').decode()}"
    lines = [witness, own] if witness_first else [own, witness]
    return body + "\n" + "\n".join(lines) + "\n"


def _key() -> Tuple[ec.EllipticCurvePrivateKey, LogKey]:
    priv = ec.generate_private_key(ec.SECP256R1())
    spki = priv.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    key_id = hashlib.sha256(spki).digest()
    return priv, LogKey(key_id, priv.public_key(), datetime(2020, 1, 1, tzinfo=timezone.utc), None)


def test_checkpoint_signatures() -> None:
    priv, key = _key()
    root = b"\x11" * 32
    proof = InclusionProof(0, 7, root, (), None)
    verify_checkpoint(_note(priv, key.key_id, root, 7), proof, key)
    verify_checkpoint(_note(priv, key.key_id, root, 7, witness_first=True), proof, key)
    with pytest.raises(TlogError, match="tree"):
        verify_checkpoint(_note(priv, key.key_id, b"\x22" * 32, 7), proof, key)
    with pytest.raises(TlogError, match="tree"):
        verify_checkpoint(_note(priv, key.key_id, root, 8), proof, key)
    other, _ = _key()
    with pytest.raises(TlogError, match="no valid signature"):
        verify_checkpoint(_note(other, key.key_id, root, 7), proof, key)
    note = _note(priv, key.key_id, root, 7)
    with pytest.raises(TlogError):
        verify_checkpoint(note.split("\n\n")[0] + "\n", proof, key)  # no signature block
    with pytest.raises(TlogError):
        verify_checkpoint(note.replace("Timestamp: 1", "Timestamp: 2"), proof, key)
