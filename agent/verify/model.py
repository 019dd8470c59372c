"""Immutable inputs and outputs of verification: trust configuration, evidence, verdict."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Mapping, Optional, Tuple

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


MODULE_REPO = "{module_repo}"  # template: filled in from the Go main module path


def _fill(text: Optional[str], value: str, as_regex: bool) -> Optional[str]:
    if text is None:
        return None
    return text.replace(MODULE_REPO, re.escape(value) if as_regex else value)


@dataclass(frozen=True)
class IdentityRule:
    """A keyless signer the host trusts: exact OIDC issuer plus a SAN, exact or regex, plus
    Fulcio certificate extension values (``(OID, value)`` pairs, exact or regex) that must
    all be present. A rule still holding a ``{module_repo}`` template (not bound to a module
    with ``bind``) matches nothing."""

    issuer: str
    san: Optional[str] = None
    san_regex: Optional[str] = None
    extensions: Tuple[Tuple[str, str], ...] = ()  # (dotted OID, exact value)
    extensions_regex: Tuple[Tuple[str, str], ...] = ()  # (dotted OID, regex on whole value)

    @property
    def templated(self) -> bool:
        texts = [self.san or "", self.san_regex or ""]
        texts += [v for _, v in self.extensions + self.extensions_regex]
        return any(MODULE_REPO in t for t in texts)

    def bind(self, module_repo: Optional[str]) -> Optional[IdentityRule]:
        """This rule with ``{module_repo}`` filled in; None when it needs a repository and
        there is none (the module is not on a host the derivation knows)."""
        if not self.templated:
            return self
        if module_repo is None:
            return None
        return IdentityRule(
            self.issuer, _fill(self.san, module_repo, False),
            _fill(self.san_regex, module_repo, True),
            tuple((o, str(_fill(v, module_repo, False))) for o, v in self.extensions),
            tuple((o, str(_fill(v, module_repo, True))) for o, v in self.extensions_regex))

    def matches(self, san: str, issuer: str,
                extensions: Optional[Mapping[str, str]] = None) -> bool:
        if issuer != self.issuer or self.templated:
            return False
        if self.san is not None:
            ok = san == self.san
        elif self.san_regex is not None:
            ok = re.fullmatch(self.san_regex, san) is not None
        else:
            ok = False
        if not ok:
            return False
        have = extensions or {}
        for oid, want in self.extensions:
            if have.get(oid) != want:
                return False
        for oid, pattern in self.extensions_regex:
            value = have.get(oid)
            if value is None or re.fullmatch(pattern, value) is None:
                return False
        return True

    def describe(self) -> str:
        who = self.san if self.san is not None else f"/{self.san_regex}/"
        claims = [f"{o}={v}" for o, v in self.extensions]
        claims += [f"{o}=~/{v}/" for o, v in self.extensions_regex]
        return f"{who} from {self.issuer}" + (f" with {', '.join(claims)}" if claims else "")


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
    # Fulcio certificate extensions (dotted OID, text) of a keyless signer, sorted by OID
    extensions: Tuple[Tuple[str, str], ...] = ()

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"kind": self.kind.value, "source": self.source}
        for name in ("key_fingerprint", "identity", "issuer", "log_index", "integrated_time",
                     "bundle_media_type"):
            out[name] = getattr(self, name)
        if self.extensions:  # keyless only: the key is absent from every other record
            out["extensions"] = dict(self.extensions)
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
