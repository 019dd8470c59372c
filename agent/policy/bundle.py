"""Signed policy bundles: a policy, its version and validity window, and the trust material
it relies on, in one DSSE envelope (``agent.envelope``), so hosts verify it offline.

The payload is canonical JSON (sorted keys, no whitespace)::

    {"version": 7, "issued_at": "2026-11-26T18:00:00Z", "expires": "2026-12-26T18:00:00Z",
     "policy": {...the normalized policy document, its "version" equal to the bundle's...},
     "trust": {"keys": {"/etc/execguard/keys/": ["-----BEGIN PUBLIC KEY-----..."]},
               "trusted_root": {"/etc/execguard/trusted_root.json": "{...}"}}}

``trust.keys`` maps every key path the policy names (``trust.keys``, rule signers, module
signers) to the PEM keys it resolved to when the bundle was built; ``trust.trusted_root``
maps the policy's trusted root path to that file's text. On the host, the policy is built
from this material only (``build_snapshot(files=...)``): what a host trusts is what was
signed, never whatever sits in /etc at apply time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from agent.envelope import Envelope, parse_envelope
from agent.errors import ExecguardError, InputError, MalformedInput
from agent.fileio import read_small_file
from agent.policy import schema
from agent.policy.build import KEY_SUFFIXES, build_snapshot, canonical_text
from agent.policy.load import load_policy
from agent.policy.model import PolicySnapshot
from agent.verify.keys import load_public_key, parse_public_key
from agent.verify.model import TrustedKey
from agent.verify.trust import build_trust

PAYLOAD_TYPE = "application/vnd.execguard.policy-bundle+json;v=1"
MAX_BUNDLE_BYTES = 8 << 20
_PAYLOAD_KEYS = frozenset({"version", "issued_at", "expires", "policy", "trust"})
_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


# -- time ----------------------------------------------------------------------------------
def format_time(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """An ISO-8601 time; ``Z`` or an offset, or none (then UTC); a date alone is midnight."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(value)
        # held in UTC: an offset that moves the time out of datetime's range is an error
        # here, not an OverflowError wherever the time is later compared or printed
        return (when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)
                ).astimezone(timezone.utc)
    except OverflowError:
        raise ValueError(f"{text!r} is out of range in UTC") from None
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO-8601 time such as 2027-01-31T12:00:00Z"
                         ) from None


def parse_expiry(text: str, issued_at: datetime) -> datetime:
    """``30d``, ``12h``, ``2w`` (after ``issued_at``) or an ISO-8601 time."""
    m = _DURATION.fullmatch(text.strip())
    if m is not None:
        try:
            return issued_at + timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
        except OverflowError:
            raise ValueError(f"{text!r} after {format_time(issued_at)} is out of range"
                             ) from None
    return parse_time(text)


def parse_duration(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``45s``, ``2w`` or plain seconds, as seconds."""
    m = _DURATION.fullmatch(text.strip())
    if m is not None:
        return float(int(m.group(1)) * _UNITS[m.group(2)])
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration such as 7d, 12h or 3600") from None


# -- the payload ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyBundle:
    """A parsed payload. Nothing in it is trusted until its signatures are checked."""

    version: int
    issued_at: datetime
    expires: datetime
    policy: Dict[str, Any]  # normalized policy document
    keys: Dict[str, Tuple[str, ...]]  # path as named in the policy -> PEM texts
    roots: Dict[str, str]  # trusted root path -> JSON text
    digest: str  # sha256: of the envelope payload bytes

    def to_payload(self) -> bytes:
        return canonical_payload(self.version, self.issued_at, self.expires, self.policy,
                                 self.keys, self.roots)

    def fingerprints(self) -> List[str]:
        """Fingerprints of every embedded key, sorted (for diffs and status)."""
        found = set()
        for pems in self.keys.values():
            for pem in pems:
                found.add(parse_public_key(pem.encode(), "bundle").fingerprint)
        return sorted(found)


def canonical_payload(version: int, issued_at: datetime, expires: datetime,
                      policy: Mapping[str, Any], keys: Mapping[str, Sequence[str]],
                      roots: Mapping[str, str]) -> bytes:
    doc = {"version": version, "issued_at": format_time(issued_at),
           "expires": format_time(expires), "policy": policy,
           "trust": {"keys": {p: list(v) for p, v in keys.items()},
                     "trusted_root": dict(roots)}}
    return canonical_text(doc).encode()


def payload_digest(payload: bytes) -> str:
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def _need(ok: bool, source: str, problem: str) -> None:
    if not ok:
        raise MalformedInput(source, f"bundle payload: {problem}")


def parse_payload(payload: bytes, source: str) -> PolicyBundle:
    """Check every field's shape; the policy must pass the schema. Raises MalformedInput."""
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedInput(source, f"bundle payload is not JSON ({exc})") from None
    _need(isinstance(doc, dict), source, "not a JSON object")
    unknown = set(doc) - _PAYLOAD_KEYS
    _need(not unknown, source, f"unknown keys {sorted(unknown)}")
    missing = _PAYLOAD_KEYS - set(doc)
    _need(not missing, source, f"missing keys {sorted(missing)}")
    version = doc["version"]
    _need(type(version) is int and 0 <= version < 2**63, source,
          "version must be an integer >= 0")
    times = {}
    for name in ("issued_at", "expires"):
        _need(isinstance(doc[name], str), source, f"{name} must be an ISO-8601 string")
        try:
            times[name] = parse_time(doc[name])
        except ValueError as exc:
            raise MalformedInput(source, f"bundle payload: {name}: {exc}") from None
    _need(times["expires"] > times["issued_at"], source, "expires is not after issued_at")
    try:
        policy = schema.normalize(doc["policy"])
    except schema.SchemaError as exc:
        raise MalformedInput(source, f"bundle policy: {exc}") from None
    _need(policy["version"] == version, source,
          f"policy version {policy['version']} differs from the bundle version {version}")
    trust = doc["trust"]
    _need(isinstance(trust, dict) and set(trust) == {"keys", "trusted_root"}, source,
          "trust must hold exactly keys and trusted_root")
    keys, roots = trust["keys"], trust["trusted_root"]
    _need(isinstance(keys, dict) and all(
        isinstance(v, list) and all(isinstance(p, str) for p in v) for v in keys.values()),
        source, "trust.keys must map paths to lists of PEM texts")
    _need(isinstance(roots, dict) and all(isinstance(v, str) for v in roots.values()),
          source, "trust.trusted_root must map paths to JSON texts")
    return PolicyBundle(version, times["issued_at"], times["expires"], policy,
                        {p: tuple(v) for p, v in keys.items()}, dict(roots),
                        payload_digest(payload))


def read_bundle_file(path: str, root_only: bool = False) -> bytes:
    """The bytes of a bundle file (regular files only, size-capped); InputError otherwise.
    ``root_only``: no symlink, root's file, writable by root alone (the drop directory)."""
    return read_small_file(path, MAX_BUNDLE_BYTES, "a policy bundle", root_only)


def parse_envelope_bytes(data: bytes, source: str) -> Envelope:
    return parse_envelope(data, source, PAYLOAD_TYPE)


def looks_like_bundle(data: bytes) -> bool:
    """True when ``data`` is a JSON object naming the policy-bundle payload type (cheap
    sniffing for ``--policy`` and ``diff``; the real parse comes after)."""
    head = data.lstrip()[:1]
    if head != b"{":
        return False
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("payloadType") == PAYLOAD_TYPE


# -- the host side: build the policy from the embedded material ------------------------------
class EmbeddedTrust:
    """``build.TrustFiles`` over a bundle's keys and trusted roots: a path the bundle does
    not hold is an error, never a read of the host's file."""

    def __init__(self, bundle: PolicyBundle, source: str) -> None:
        self.keys: Dict[str, List[TrustedKey]] = {}
        for path, pems in bundle.keys.items():
            where = f"{source}: bundle trust.keys[{path!r}]"
            self.keys[path] = [parse_public_key(pem.encode(), f"{where}[{i}]")
                               for i, pem in enumerate(pems)]
        self.roots: Dict[str, bytes] = {}
        for path, text in bundle.roots.items():
            try:
                doc = json.loads(text)
            except (ValueError, RecursionError) as exc:
                raise MalformedInput(source, f"bundle trusted root {path}: not JSON ({exc})"
                                     ) from None
            if not isinstance(doc, dict):
                raise MalformedInput(source, f"bundle trusted root {path}: not a JSON object")
            self.roots[path] = text.encode()

    def keys_at(self, path: str) -> List[TrustedKey]:
        if path not in self.keys:
            raise ExecguardError(f"{path}: not in the policy bundle's trust material")
        return list(self.keys[path])

    def root_at(self, path: str) -> bytes:
        if path not in self.roots:
            raise ExecguardError(f"{path}: the policy bundle holds no such trusted root")
        return self.roots[path]


def bundle_snapshot(bundle: PolicyBundle, source: str, state_dir: Optional[str] = None,
                    log_dir: Optional[str] = None) -> PolicySnapshot:
    """The complete snapshot of a verified bundle, or MalformedInput (nothing half-built).
    ``state_dir``/``log_dir`` are the host's own places (``execguard run`` flags)."""
    doc = dict(bundle.policy)
    overrides = []
    for flag, key, value in (("--state-dir", "state_dir", state_dir),
                             ("--log-dir", "log_dir", log_dir)):
        if value is not None:
            doc[key] = os.path.abspath(value)
            overrides.append(f"{flag} {doc[key]}")
    try:
        normalized = schema.normalize(doc)
    except schema.SchemaError as exc:
        raise MalformedInput(source, f"bundle policy: {exc}") from None
    return build_snapshot(normalized, source, (), tuple(overrides),
                          EmbeddedTrust(bundle, source))


# -- the build side ------------------------------------------------------------------------
def _key_paths(policy: Mapping[str, Any]) -> List[str]:
    """Every key path the policy names, in order, without repeats."""
    paths: List[str] = list(policy["trust"]["keys"])
    for rule in policy["rules"]:
        signer_lists = [rule["signers"]] if rule.get("signers") else []
        go = rule.get("go") or {}
        signer_lists += list(go.get("module_signers") or [])
        for signers in signer_lists:
            paths += [k for k in signers["keys"] if not k.startswith("sha256:")]
    return list(dict.fromkeys(paths))


def _read_keys(path: str) -> List[str]:
    """The PEM texts ``path`` resolves to, by the same rules as the host's policy loader."""
    if os.path.isdir(path):
        pems = []
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if name.startswith(".") or not name.endswith(KEY_SUFFIXES):
                continue
            if stat.S_ISREG(os.stat(full).st_mode):
                pems.append(_pem_text(load_public_key(full)))
        return pems
    if path.endswith("/") and not os.path.exists(path):
        return []  # a missing key directory trusts nobody, as on the host
    return [_pem_text(load_public_key(path))]


def _pem_text(key: TrustedKey) -> str:
    from cryptography.hazmat.primitives import serialization

    return str(key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())


def build_bundle(policy_path: str, version: Optional[int], issued_at: datetime,
                 expires: datetime) -> Tuple[Envelope, PolicyBundle, PolicySnapshot]:
    """An unsigned bundle for the policy file at ``policy_path``; ``version`` replaces the
    policy's own. The result is built back through the host's path before it is returned,
    so a bundle that would not load on a host is never written."""
    snapshot = load_policy(policy_path)  # every error names the file and key
    policy: Dict[str, Any] = json.loads(snapshot.canonical)
    if version is not None:
        policy["version"] = version
        policy = schema.normalize(policy)
    if expires <= issued_at:
        raise MalformedInput(policy_path, "the expiry is not after issued_at")
    keys: Dict[str, Tuple[str, ...]] = {}
    for path in _key_paths(policy):
        try:
            keys[path] = tuple(_read_keys(path))
        except OSError as exc:
            raise InputError(path, exc.strerror or str(exc)) from None
    roots: Dict[str, str] = {}
    root_path = policy["trust"]["trusted_root"]
    if root_path is not None:
        data = build_trust(trusted_root=root_path).trusted_root
        assert data is not None
        try:
            roots[root_path] = data.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedInput(root_path, "trusted root is not UTF-8 JSON") from None
    payload = canonical_payload(policy["version"], issued_at, expires, policy, keys, roots)
    bundle = parse_payload(payload, policy_path)
    built = bundle_snapshot(bundle, policy_path)
    return Envelope(PAYLOAD_TYPE, payload), bundle, built
