"""Real material for the policy-bundle tests: policy root keys made by ``agent.signing``,
policy files, and bundles built and signed by the same code ``execguard policy`` uses."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, Optional, Sequence

from agent import signing
from agent.envelope import Envelope
from agent.policy.bundle import PAYLOAD_TYPE, build_bundle
from agent.signing import PrivateKey

ROOT_NAMES = ("r1", "r2", "r3")  # pinned: the 2-of-3 policy root
UNPINNED = "stranger"  # a well-formed key no host pins ("wrong key")


@dataclass(frozen=True)
class RootKeys:
    private: Dict[str, PrivateKey]
    private_pem: Dict[str, Path]  # plain PEM files, for the CLI's --key
    pinned_dir: Path  # r1..r3 public keys only


def root_keys(base: Path) -> RootKeys:
    base.mkdir(parents=True, exist_ok=True)
    pinned = base / "pinned"
    pinned.mkdir()
    private, pems = {}, {}
    for name in (*ROOT_NAMES, UNPINNED):
        key = signing.generate("ecdsa-p256")
        private[name] = key
        pems[name] = base / f"{name}.key.pem"
        pems[name].write_bytes(signing.plain_private_pem(key))
        if name in ROOT_NAMES:
            (pinned / f"{name}.pub").write_bytes(signing.public_pem(key.public_key()))
    return RootKeys(private, pems, pinned)


def write_policy(path: Path, version: int, scope: Path, trusted_key: Path,
                 mode: str = "enforce") -> Path:
    """Go binaries in ``scope`` need a signature by ``trusted_key``; nothing else is asked."""
    path.write_text(f"""version = {version}
mode = "{mode}"
scopes = ["{scope}"]
fallthrough = "allow"

[trust]
keys = ["{trusted_key}"]

[[rules]]
id = "go-signed"
action = "require-signature"
match = {{ go = true }}
""")
    return path


def make_bundle(out: Path, policy: Path, signers: Sequence[PrivateKey],
                version: Optional[int] = None, issued_at: Optional[datetime] = None,
                lifetime: timedelta = timedelta(days=30)) -> Path:
    issued = issued_at or datetime.now(timezone.utc).replace(microsecond=0)
    env, _bundle, _snap = build_bundle(str(policy), version, issued, issued + lifetime)
    for key in signers:
        env = env.signed_by(key)
    out.write_bytes(env.to_bytes())
    return out


def tampered(src: Path, out: Path) -> Path:
    """``src`` with one byte of its payload's policy changed and the signatures kept."""
    doc = json.loads(src.read_bytes())
    payload = base64.b64decode(doc["payload"])
    changed = payload.replace(b'"mode":"enforce"', b'"mode":"monitor"', 1)
    assert changed != payload
    doc["payload"] = base64.b64encode(changed).decode()
    out.write_text(json.dumps(doc))
    return out


def signed_payload(out: Path, payload: bytes, signers: Sequence[PrivateKey]) -> Path:
    """Any payload bytes in a correctly signed envelope (for malformed-content cases)."""
    env = Envelope(PAYLOAD_TYPE, payload)
    for key in signers:
        env = env.signed_by(key)
    out.write_bytes(env.to_bytes())
    return out
