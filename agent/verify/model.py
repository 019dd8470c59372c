"""Immutable inputs and outputs of verification: trust configuration, evidence, verdict."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Optional, Tuple

from agent.errors import Reason


class SignatureKind(str, Enum):
    COSIGN_SIG = "cosign-sig"  # base64 DER signature over the file bytes, checked with a key
    BUNDLE_KEYLESS = "sigstore-bundle-keyless"  # Fulcio certificate + transparency log
    BUNDLE_KEY = "sigstore-bundle-key"  # managed key (publicKey hint)
    COSIGN_LEGACY_BUNDLE = "cosign-legacy-bundle"  # cosign --bundle JSON with rekorBundle


@dataclass(frozen=True)
class TrustedKey:
    """A PEM public key the host trusts; ``fingerprint`` is ``sha256:<hex of SPKI DER>``."""

    public_key: Any  # a cryptography public key object
    fingerprint: str
    source: str  # file it came from, for explanations


@dataclass(frozen=True)
class IdentityRule:
    """A keyless signer the host trusts: exact OIDC issuer plus a SAN, exact or regex."""

    issuer: str
    san: Optional[str] = None
    san_regex: Optional[str] = None

    def matches(self, san: str, issuer: str) -> bool:
        if issuer != self.issuer:
            return False
        if self.san is not None:
            return san == self.san
        if self.san_regex is not None:
            return re.fullmatch(self.san_regex, san) is not None
        return False

    def describe(self) -> str:
        who = self.san if self.san is not None else f"/{self.san_regex}/"
        return f"{who} from {self.issuer}"


@dataclass(frozen=True)
class TrustConfig:
    """Everything the verifier may trust. Built once, passed down, never global."""

    keys: Tuple[TrustedKey, ...] = ()
    identities: Tuple[IdentityRule, ...] = ()
    trusted_root: Optional[bytes] = None  # raw trusted_root.json (Fulcio CAs, Rekor keys)
    trusted_root_source: Optional[str] = None
    store_dirs: Tuple[str, ...] = ()  # signature stores: files named by the artifact's sha256


@dataclass(frozen=True)
class Evidence:
    """What a signature proved (or claimed, when untrusted): enough to re-verify later."""

    kind: SignatureKind
    source: str  # signature/bundle file, or "<inline>"
    key_fingerprint: Optional[str] = None
    identity: Optional[str] = None
    issuer: Optional[str] = None
    log_index: Optional[int] = None
    integrated_time: Optional[int] = None
    bundle_media_type: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"kind": self.kind.value, "source": self.source}
        for name in ("key_fingerprint", "identity", "issuer", "log_index", "integrated_time",
                     "bundle_media_type"):
            out[name] = getattr(self, name)
        return out


@dataclass(frozen=True)
class Verdict:
    """The answer for one file: trusted or not, a stable reason code, and a human detail."""

    trusted: bool
    reason: Reason
    detail: str
    evidence: Optional[Evidence] = None
    attempts: Tuple[Verdict, ...] = field(default=())  # every signature tried, for explanations

    @classmethod
    def ok(cls, evidence: Evidence, detail: str) -> Verdict:
        return cls(True, Reason.OK, detail, evidence)

    @classmethod
    def fail(cls, reason: Reason, detail: str, evidence: Optional[Evidence] = None) -> Verdict:
        return cls(False, reason, detail, evidence)
