"""Would this host apply that policy bundle? Pinned keys, an M-of-N threshold, anti-rollback
and expiry, checked in a fixed order so that the reason given is always the same one.

When several problems apply, the first in this list is the reason (docs/bundles.md):

1. ``malformed``: the file is not a DSSE envelope of the policy-bundle type.
2. ``bad-signature``: a signature names a pinned key and does not verify. A tampered
   payload breaks every signature, so it lands here; a bad signature by a pinned key is
   refused even when other pinned keys meet the threshold, because the signers did not
   all sign these bytes and the envelope has been altered.
3. ``threshold``: fewer distinct pinned keys signed than required. Signatures by keys
   nobody pinned ("wrong key") do not count, and are reported as ``unknown``.
4. ``malformed``: the signed payload or the policy in it is invalid (nothing is applied).
   Content is judged only once it is authenticated.
5. ``rollback``: the version is not above the one in force (``min_version``).
6. ``expired``: ``expires`` is past.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Dict, Mapping, Optional, Tuple

from agent.envelope import Envelope, SignatureReport, check_signatures
from agent.errors import ExecguardError, InputError, MalformedInput
from agent.policy.build import KEY_SUFFIXES
from agent.policy.bundle import (
    PolicyBundle,
    bundle_snapshot,
    format_time,
    parse_envelope_bytes,
    parse_payload,
    payload_digest,
)
from agent.policy.model import PolicySnapshot
from agent.verify.keys import load_public_key
from agent.verify.model import TrustedKey


class BundleReason(str, Enum):
    """Why a bundle is (not) applied. A public contract: never rename one."""

    OK = "ok"
    THRESHOLD = "threshold"
    BAD_SIGNATURE = "bad-signature"
    ROLLBACK = "rollback"
    EXPIRED = "expired"
    MALFORMED = "malformed"


@dataclass(frozen=True)
class BundleCheck:
    reason: BundleReason
    detail: str
    digest: Optional[str] = None  # sha256 of the envelope payload
    bundle: Optional[PolicyBundle] = None  # parsed payload (authenticated when accepted)
    envelope: Optional[Envelope] = None
    signatures: Optional[SignatureReport] = None
    threshold: int = 1
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.reason is BundleReason.OK

    @property
    def version(self) -> Optional[int]:
        return self.bundle.version if self.bundle is not None else None

    def to_json(self) -> Dict[str, Any]:
        b, s = self.bundle, self.signatures
        return {
            "verdict": "accept" if self.accepted else "reject",
            "reason": self.reason.value, "detail": self.detail,
            "version": b.version if b is not None else None, "digest": self.digest,
            "issued_at": format_time(b.issued_at) if b is not None else None,
            "expires": format_time(b.expires) if b is not None else None,
            "threshold": self.threshold,
            "signers": {"valid": list(s.valid) if s else [],
                        "invalid": list(s.invalid) if s else [],
                        "unknown": list(s.unknown) if s else []},
            **self.extra,
        }


def load_pinned(directory: str) -> Dict[str, TrustedKey]:
    """The policy root keys: every ``*.pub``/``*.pem`` in ``directory``, by fingerprint."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise InputError(directory, f"policy key directory: {exc.strerror or exc}") from None
    keys: Dict[str, TrustedKey] = {}
    for name in names:
        full = os.path.join(directory, name)
        if name.startswith(".") or not name.endswith(KEY_SUFFIXES):
            continue
        try:
            if not stat.S_ISREG(os.stat(full).st_mode):
                continue
        except OSError:
            continue
        key = load_public_key(full)
        keys.setdefault(key.fingerprint, key)
    return keys


def check_threshold(threshold: int, pinned: Mapping[str, TrustedKey], where: str) -> None:
    """A threshold no set of pinned keys can meet, or below 1, is a configuration error."""
    if threshold < 1:
        raise ExecguardError(f"{where}: the threshold must be at least 1, not {threshold}")
    if threshold > len(pinned):
        raise ExecguardError(f"{where}: threshold {threshold} but only {len(pinned)} pinned "
                             "policy key(s): no bundle could ever be applied")


def check_bundle(data: bytes, source: str, pinned: Mapping[str, TrustedKey], threshold: int,
                 now: datetime, min_version: Optional[int] = None,
                 state_dir: Optional[str] = None, log_dir: Optional[str] = None
                 ) -> Tuple[BundleCheck, Optional[PolicySnapshot]]:
    """The verdict on the bundle bytes ``data``, and when accepted (or only expired or a
    rollback) the complete policy snapshot it yields, else None."""
    try:
        env = parse_envelope_bytes(data, source)
    except MalformedInput as exc:
        return BundleCheck(BundleReason.MALFORMED, str(exc), threshold=threshold), None
    digest = payload_digest(env.payload)
    report = check_signatures(env, pinned)

    def verdict(reason: BundleReason, detail: str, parsed: Optional[PolicyBundle]
                ) -> BundleCheck:
        return BundleCheck(reason, detail, digest, parsed, env, report, threshold)

    try:  # parsed for the report only, until the signatures hold
        bundle: Optional[PolicyBundle] = parse_payload(env.payload, source)
    except MalformedInput:
        bundle = None
    if report.invalid:
        return verdict(BundleReason.BAD_SIGNATURE,
                       f"signature by pinned key {report.invalid[0]} does not verify over "
                       "this payload (altered after signing?)", bundle), None
    if not report.meets(threshold):
        unknown = f"; {len(report.unknown)} by keys not pinned here" if report.unknown else ""
        return verdict(BundleReason.THRESHOLD,
                       f"{len(report.valid)} valid signature(s) by distinct pinned keys, "
                       f"{threshold} required{unknown}", bundle), None
    try:
        bundle = parse_payload(env.payload, source)
        snapshot = bundle_snapshot(bundle, source, state_dir, log_dir)
    except ExecguardError as exc:
        return verdict(BundleReason.MALFORMED, exc.diagnostics(), bundle), None
    if min_version is not None and bundle.version < min_version:
        return verdict(BundleReason.ROLLBACK,
                       f"version {bundle.version} is below the minimum {min_version}",
                       bundle), snapshot
    if now >= bundle.expires:
        return verdict(BundleReason.EXPIRED, f"expired at {format_time(bundle.expires)}",
                       bundle), snapshot
    return verdict(BundleReason.OK,
                   f"{len(report.valid)} of {threshold} required pinned signatures; "
                   f"version {bundle.version}; expires {format_time(bundle.expires)}",
                   bundle), snapshot
