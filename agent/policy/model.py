"""The policy as immutable, validated objects: what ``load`` produces and ``evaluate`` reads.

Nothing here does I/O or re-checks shapes; ``agent.policy.load`` builds these objects only
from a document that ``agent.policy.schema`` has already validated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from typing import Optional, Protocol, Tuple

from agent.errors import ExecguardError, Reason
from agent.goinfo.model import BuildInfo
from agent.policy.globs import Glob
from agent.verify.model import Evidence, IdentityRule, TrustConfig, TrustedKey


class Mode(str, Enum):
    MONITOR = "monitor"  # decide and record; block nothing
    ENFORCE = "enforce"  # block what the policy denies


class Action(str, Enum):
    ALLOW = "allow"
    DENY = "deny"
    REQUIRE_SIGNATURE = "require-signature"


@dataclass(frozen=True)
class Subject:
    """The file being exec'd, as policy sees it.

    ``go`` is True when the file carries Go build info, and also when that build info is
    present but unreadable (then ``buildinfo`` is None and every Go predicate fails).
    ``evidence`` is filled in by ``decide`` once a signature is trusted.
    """

    path: str
    uid: int
    go: bool = False
    buildinfo: Optional[BuildInfo] = None
    evidence: Optional[Evidence] = None

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError(f"subject path must be absolute, got {self.path!r}")
        if self.buildinfo is not None and not self.go:
            raise ValueError("a subject with build info is a Go subject")

    @property
    def module(self) -> Optional[str]:
        """The main module path, when the build info names one."""
        if self.buildinfo is None or self.buildinfo.main is None:
            return None
        return self.buildinfo.main.path


class PolicyViolation(ExecguardError):
    """A predicate rejected the subject; ``reason`` is the stable code for the logs."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Predicate(Protocol):
    """One requirement on a subject: returns quietly or raises ``PolicyViolation``."""

    def check(self, subject: Subject) -> None: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class SignerSpec:
    """Who may have signed: trusted keys and keyless identities (either is enough)."""

    keys: Tuple[TrustedKey, ...] = ()
    identities: Tuple[IdentityRule, ...] = ()

    @property
    def fingerprints(self) -> Tuple[str, ...]:
        return tuple(k.fingerprint for k in self.keys)

    def accepts(self, evidence: Optional[Evidence]) -> bool:
        if evidence is None:
            return False
        if evidence.key_fingerprint is not None and evidence.key_fingerprint in self.fingerprints:
            return True
        if evidence.identity is None or evidence.issuer is None:
            return False
        return any(r.matches(evidence.identity, evidence.issuer) for r in self.identities)

    def describe(self) -> str:
        names = list(self.fingerprints) + [r.describe() for r in self.identities]
        return ", ".join(names) if names else "nobody"


@dataclass(frozen=True)
class Match:
    """Which subjects a rule applies to; every condition given must hold."""

    paths: Tuple[Glob, ...]
    go: Optional[bool] = None  # None: Go or not
    uids: Optional[Tuple[int, ...]] = None  # None: any uid
    module: Optional[Glob] = None  # main module path; a non-Go file never matches

    def matches(self, subject: Subject) -> bool:
        if self.go is not None and subject.go != self.go:
            return False
        if self.uids is not None and subject.uid not in self.uids:
            return False
        if self.module is not None:
            module = subject.module
            if module is None or not self.module.matches(module):
                return False
        return any(g.matches(subject.path) for g in self.paths)


@dataclass(frozen=True)
class ModulePin:
    """Binaries whose main module matches ``module`` must be signed by ``signers``."""

    module: Glob
    signers: SignerSpec


@dataclass(frozen=True)
class Rule:
    """One ordered rule. ``trust`` is what a require-signature rule verifies against."""

    rule_id: str
    action: Action
    match: Match
    source_line: Optional[int] = None
    description: str = ""
    trust: Optional[TrustConfig] = None  # require-signature only: global trust, narrowed
    predicate: Optional[Predicate] = None  # Go predicates, checked after a trusted signature
    module_pins: Tuple[ModulePin, ...] = ()

    def where(self) -> str:
        line = f" (line {self.source_line})" if self.source_line is not None else ""
        return f"rule {self.rule_id}{line}"


@dataclass(frozen=True)
class Limits:
    decision_deadline_ms: int  # answer every permission event within this (on_timeout)
    max_file_bytes: int  # larger files are not hashed on the decision path


@dataclass(frozen=True)
class PolicySnapshot:
    """A complete, validated policy generation; swapped whole, never edited in place.

    ``digest`` is the sha256 of ``canonical`` (the document with every default filled in,
    keys sorted, no whitespace), so a TOML file and its JSON twin share a digest.
    ``trust_digest`` covers the key material and trusted root the trust paths resolved to.
    """

    version: int
    digest: str
    trust_digest: str
    source: str
    canonical: str
    mode: Mode
    scopes: Tuple[Glob, ...]
    rules: Tuple[Rule, ...]
    fallthrough: Action  # ALLOW or DENY when no rule matches
    on_timeout: Action  # ALLOW or DENY: the answer when a decision misses its deadline
    state_dir: str
    log_dir: str
    limits: Limits
    trust: TrustConfig
    warnings: Tuple[str, ...] = ()
    overrides: Tuple[str, ...] = ()  # CLI flags applied on top of ``source``

    @property
    def effective_on_timeout(self) -> Action:
        """Monitor mode blocks nothing, a late answer included."""
        return Action.ALLOW if self.mode is Mode.MONITOR else self.on_timeout

    def in_scope(self, path: str) -> bool:
        return any(g.matches(path) for g in self.scopes)

    def scope_roots(self) -> Tuple[str, ...]:
        """Directories to watch and pre-scan: the fixed prefix of each scope glob."""
        roots = sorted({g.root() for g in self.scopes})
        kept = [r for r in roots
                if not any(r != o and (o == "/" or r.startswith(o + "/")) for o in roots)]
        return tuple(kept)

    def rule(self, rule_id: str) -> Optional[Rule]:
        for r in self.rules:
            if r.rule_id == rule_id:
                return r
        return None


def trust_digest(trust: TrustConfig) -> str:
    """sha256 over the trust material itself (not its file names): binds cached verdicts."""
    doc = {
        "keys": sorted(k.fingerprint for k in trust.keys),
        "identities": sorted([r.issuer, r.san or "", r.san_regex or ""] for r in trust.identities),
        "trusted_root": (hashlib.sha256(trust.trusted_root).hexdigest()
                         if trust.trusted_root is not None else None),
        "stores": sorted(trust.store_dirs),
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
