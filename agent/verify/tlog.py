"""Rekor entries checked offline: SET, RFC 6962 inclusion proof, signed checkpoint, and that the
entry body records *this* digest, signature and key (CVE-2022-36056 class)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, List, Optional, Tuple

from cryptography.exceptions import InvalidSignature

from agent.verify.trusted_root import LogKey, TrustRoot, b64decode, verify_with_key

MAX_PROOF_HASHES = 64  # a tree of 2^64 leaves; longer proofs are garbage


class TlogError(Exception):
    """The transparency-log evidence does not hold."""


@dataclass(frozen=True)
class InclusionProof:
    log_index: int  # index within the (shard) tree, not the global logIndex
    tree_size: int
    root_hash: bytes
    hashes: Tuple[bytes, ...]
    checkpoint: Optional[str]


@dataclass(frozen=True)
class TlogEntry:
    log_index: int
    log_id: bytes
    kind: str
    version: str
    integrated_time: int  # 0 = absent (proto3 default)
    body: bytes
    signed_entry_timestamp: Optional[bytes]
    proof: Optional[InclusionProof]
    body_b64: Optional[str] = None  # legacy bundles: the SET covers this exact string


def _int(value: Any, what: str) -> int:
    """proto3 JSON int64: a decimal string or a number; omitted = 0."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what} is not an integer")
    if isinstance(value, str) and not re.fullmatch(r"-?[0-9]{1,20}", value):
        raise ValueError(f"{what} is not an integer")
    out = int(value)
    if out < 0:
        raise ValueError(f"{what} is negative")
    return out


def parse_bundle_entry(obj: Any) -> TlogEntry:
    """A protobuf-bundle ``tlogEntries[i]`` (proto3 JSON). Raises ValueError when malformed."""
    if not isinstance(obj, dict):
        raise ValueError("tlog entry is not an object")
    kv = obj.get("kindVersion")
    if not isinstance(kv, dict) or not kv.get("kind") or not kv.get("version"):
        raise ValueError("tlog entry kindVersion missing")
    promise = obj.get("inclusionPromise")
    set_ = None
    if isinstance(promise, dict) and promise.get("signedEntryTimestamp"):
        set_ = b64decode(promise["signedEntryTimestamp"], "signedEntryTimestamp")
    raw_proof = obj.get("inclusionProof")
    proof = None
    if isinstance(raw_proof, dict):
        hashes = raw_proof.get("hashes") or []
        if not isinstance(hashes, list) or len(hashes) > MAX_PROOF_HASHES:
            raise ValueError("inclusionProof.hashes is not a short list")
        checkpoint = (raw_proof.get("checkpoint") or {}).get("envelope")
        proof = InclusionProof(
            _int(raw_proof.get("logIndex"), "inclusionProof.logIndex"),
            _int(raw_proof.get("treeSize"), "inclusionProof.treeSize"),
            b64decode(raw_proof.get("rootHash"), "inclusionProof.rootHash"),
            tuple(b64decode(h, "inclusionProof.hashes") for h in hashes),
            checkpoint if isinstance(checkpoint, str) else None)
    return TlogEntry(
        _int(obj.get("logIndex"), "logIndex"),
        b64decode((obj.get("logId") or {}).get("keyId"), "logId.keyId"),
        str(kv["kind"]), str(kv["version"]),
        _int(obj.get("integratedTime"), "integratedTime"),
        b64decode(obj.get("canonicalizedBody"), "canonicalizedBody"), set_, proof)


def set_payload(body_b64: str, integrated_time: int, log_id_hex: str, log_index: int) -> bytes:
    """RFC 8785 canonical JSON of the four SET fields. Keys are pre-sorted; the values are
    ASCII strings (base64/hex, nothing to escape) and integers, for which JCS is plain JSON."""
    for text in (body_b64, log_id_hex):
        if not re.fullmatch(r"[A-Za-z0-9+/=]*", text):
            raise TlogError("SET field has characters that need escaping")
    return json.dumps({"body": body_b64, "integratedTime": integrated_time,
                       "logID": log_id_hex, "logIndex": log_index},
                      separators=(",", ":")).encode()


def _log_key(entry: TlogEntry, root: TrustRoot) -> LogKey:
    key = root.tlogs.get(entry.log_id)
    if key is None:  # never fall back to trying every key
        raise TlogError(f"entry from unknown transparency log {entry.log_id.hex()[:16]}")
    return key


def verify_entry(entry: TlogEntry, root: TrustRoot, require_proof: bool) -> Optional[datetime]:
    """Check the SET and/or proof + checkpoint. Returns the SET-verified integration time."""
    key = _log_key(entry, root)
    verified: Optional[datetime] = None
    if entry.signed_entry_timestamp is not None:
        body_b64 = entry.body_b64 or base64.b64encode(entry.body).decode()
        payload = set_payload(body_b64, entry.integrated_time,
                              entry.log_id.hex(), entry.log_index)
        try:
            verify_with_key(key.public_key, entry.signed_entry_timestamp, payload)
        except InvalidSignature:
            raise TlogError("signed entry timestamp (SET) is invalid") from None
        verified = datetime.fromtimestamp(entry.integrated_time, tz=timezone.utc)
        if not key.valid_at(verified):
            raise TlogError("log key was not valid at the entry's integrated time")
    if entry.proof is not None:
        verify_inclusion(entry, entry.proof, key)
    elif require_proof:
        raise TlogError("inclusion proof missing (required for bundle v0.2 and later)")
    if verified is None and entry.proof is None:
        raise TlogError("entry has neither a SET nor an inclusion proof")
    return verified


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def merkle_root(index: int, size: int, leaf: bytes, path: Tuple[bytes, ...]) -> bytes:
    """Root implied by an RFC 9162 §2.1.3.2 inclusion proof."""
    if index >= size:
        raise TlogError("inclusion proof index is outside the tree")
    fn, sn, node = index, size - 1, leaf
    for sibling in path:
        if sn == 0:
            raise TlogError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            node = _node(sibling, node)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            node = _node(node, sibling)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise TlogError("inclusion proof is too short")
    return node


def verify_inclusion(entry: TlogEntry, proof: InclusionProof, key: LogKey) -> None:
    leaf = hashlib.sha256(b"\x00" + entry.body).digest()
    if merkle_root(proof.log_index, proof.tree_size, leaf, proof.hashes) != proof.root_hash:
        raise TlogError("inclusion proof does not lead to its root hash")
    if proof.checkpoint is None:
        raise TlogError("inclusion proof has no signed checkpoint")
    verify_checkpoint(proof.checkpoint, proof, key)


def verify_checkpoint(note: str, proof: InclusionProof, key: LogKey) -> None:
    """A signed note: body lines, a blank line, then ``— name b64(keyhint[4] || sig)`` lines.
    The log's own line (by key hint) must verify; witness cosignatures are ignored."""
    body, sep, sigs = note.partition("\n\n")
    if not sep:
        raise TlogError("checkpoint has no signature block")
    lines = body.split("\n")
    if len(lines) < 3 or not lines[0]:
        raise TlogError("checkpoint lacks origin, size or root hash")
    try:
        size, root_hash = int(lines[1]), base64.b64decode(lines[2], validate=True)
    except ValueError:
        raise TlogError("checkpoint size or root hash is malformed") from None
    if size != proof.tree_size or root_hash != proof.root_hash:
        raise TlogError("checkpoint does not match the inclusion proof's tree")
    signed = (body + "\n").encode()
    tried: List[str] = []
    for line in sigs.split("\n"):
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != "\u2014":
            continue
        try:
            raw = base64.b64decode(parts[2], validate=True)
        except ValueError:
            continue
        if raw[:4] != key.key_id[:4]:
            continue
        try:
            verify_with_key(key.public_key, raw[4:], signed)
            return
        except InvalidSignature:
            tried.append(parts[1])
    raise TlogError("checkpoint has no valid signature by the log" +
                    (f" (bad: {', '.join(tried)})" if tried else ""))


def _pem_der(text: str) -> bytes:
    """DER of the first PEM block (certificate or public key): compare DER, never PEM text."""
    m = re.search(r"-----BEGIN [A-Z ]+-----(.*?)-----END [A-Z ]+-----", text, re.S)
    if not m:
        raise TlogError("entry body key is not PEM")
    return b64decode("".join(m.group(1).split()), "entry body PEM")


def check_hashedrekord(entry: TlogEntry, digest: bytes, signature: bytes,
                       signer_der: bytes) -> None:
    """The entry body must record this SHA-256 digest, signature and key (SPKI or cert DER)."""
    try:
        body = json.loads(entry.body)
        if body.get("kind") != entry.kind or body.get("apiVersion") != entry.version:
            raise TlogError("entry body kind/version differ from kindVersion")
        if entry.kind != "hashedrekord":
            raise TlogError(f"unsupported tlog entry kind {entry.kind}")
        spec = body["spec"]
        if entry.version == "0.0.1":
            h = spec["data"]["hash"]
            alg, value = h["algorithm"], bytes.fromhex(h["value"])
            sig = b64decode(spec["signature"]["content"], "entry signature")
            pem = b64decode(spec["signature"]["publicKey"]["content"], "entry key").decode()
            key_der = _pem_der(pem)
            alg_ok = alg == "sha256"
        elif entry.version == "0.0.2":
            v2 = spec["hashedRekordV002"]
            value = b64decode(v2["data"]["digest"], "entry digest")
            alg_ok = v2["data"]["algorithm"] == "SHA2_256"
            sig = b64decode(v2["signature"]["content"], "entry signature")
            verifier = v2["signature"]["verifier"]
            holder = verifier.get("publicKey") or verifier.get("x509Certificate") or {}
            key_der = b64decode(holder.get("rawBytes"), "entry key")
        else:
            raise TlogError(f"unsupported hashedrekord version {entry.version}")
    except TlogError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise TlogError(f"entry body is malformed ({type(exc).__name__}: {exc})") from None
    if not alg_ok or value != digest:
        raise TlogError("entry body records a different artifact digest")
    if sig != signature:
        raise TlogError("entry body records a different signature")
    if key_der != signer_der:
        raise TlogError("entry body records a different key or certificate")
