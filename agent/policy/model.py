"""The policy as immutable, validated objects: what ``load`` produces and ``evaluate`` reads.

Nothing here does I/O or re-checks shapes; ``agent.policy.load`` builds these objects only
from a document that ``agent.policy.schema`` has already validated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import Any, List, Optional, Protocol, Tuple

from agent.errors import ExecguardError, Reason
from agent.goinfo.model import BuildInfo
from agent.policy.globs import Glob
from agent.policy.templates import module_repo
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

    ``go`` is True when the file carries Go build info, when it has none readable but the
    Go runtime's pclntab is there, and when either is present but broken (then
    ``buildinfo`` is None and every Go predicate fails). ``go_evidence`` says which
    (``agent.goinfo``: "build-info", "runtime", "malformed"; None when not Go, or when the
    subject was made without it), ``go_detail`` says why in words and ``go_runtime``
    describes the runtime tables found.
    ``evidence`` is filled in by ``decide`` once a signature is trusted. ``gid`` is the
    exec'ing process's gid and ``owner_uid``/``owner_gid`` the file's owner (its fstat);
    None means unknown, and a rule matching on an unknown value does not match.
    """

    path: str
    uid: int
    go: bool = False
    buildinfo: Optional[BuildInfo] = None
    evidence: Optional[Evidence] = None
    gid: Optional[int] = None
    owner_uid: Optional[int] = None
    owner_gid: Optional[int] = None
    go_evidence: Optional[str] = None
    go_detail: str = ""
    go_runtime: Optional[str] = None

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
        extensions = dict(evidence.extensions)
        return any(r.matches(evidence.identity, evidence.issuer, extensions)
                   for r in self.identities)

    def bind(self, module: Optional[str]) -> SignerSpec:
        """``{module_repo}`` filled in from the main module ``module``; an identity whose
        template cannot be filled (no derivable repository) is dropped: it trusts nobody."""
        repo = module_repo(module)
        bound = (r.bind(repo) for r in self.identities)
        return SignerSpec(self.keys, tuple(r for r in bound if r is not None))

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
    gids: Optional[Tuple[int, ...]] = None  # the exec's gid; unknown never matches
    owner_uids: Optional[Tuple[int, ...]] = None  # the file's owner; unknown never matches
    owner_gids: Optional[Tuple[int, ...]] = None  # the file's group; unknown never matches

    def matches(self, subject: Subject) -> bool:
        if self.go is not None and subject.go != self.go:
            return False
        if self.uids is not None and subject.uid not in self.uids:
            return False
        for wanted, have in ((self.gids, subject.gid), (self.owner_uids, subject.owner_uid),
                             (self.owner_gids, subject.owner_gid)):
            if wanted is not None and (have is None or have not in wanted):
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
    mode: Optional[Mode] = None  # None: the policy's mode

    def effective_mode(self, policy_mode: Mode) -> Mode:
        """The policy's mode is the ceiling: in a monitor policy (``--mode monitor``, a
        break-glass overlay) no rule blocks; in an enforce policy a monitor rule does not."""
        if policy_mode is Mode.MONITOR or self.mode is Mode.MONITOR:
            return Mode.MONITOR
        return Mode.ENFORCE

    def where(self) -> str:
        line = f" (line {self.source_line})" if self.source_line is not None else ""
        return f"rule {self.rule_id}{line}"


@dataclass(frozen=True)
class Limits:
    decision_deadline_ms: int  # answer every permission event within this (on_timeout)
    max_file_bytes: int  # larger files are not hashed on the decision path


@dataclass(frozen=True)
class Boundary:
    """What counts as running a program besides execve (docs/policy.md, "boundary").
    Enforce mode blocks what these deny; monitor mode records it."""

    loader_exec: bool = False  # a dynamic loader run as a program (ld.so ./prog) may run
    judge_mappings: bool = True  # PROT_EXEC mappings of files in scope are judged like execs
    ptrace: bool = False  # ptrace attach to a program in scope is allowed
    mounts: bool = False  # mounts onto paths in scope are allowed (only while scopes are partial)
    unseen_in_scope: bool = True  # a filesystem the agent has not placed yet is in scope


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
    boundary: Boundary = Boundary()
    on_agent_exit: str = "fail-open"  # or "keep-enforcing" (docs/policy.md)

    @property
    def keeps_enforcing(self) -> bool:
        """Enforcement outlives the agent, self-protected (bpf-lsm; in enforce mode only:
        a monitor policy denies nothing, so nothing is pinned)."""
        return self.mode is Mode.ENFORCE and self.on_agent_exit == "keep-enforcing"

    @property
    def effective_on_timeout(self) -> Action:
        """Monitor mode blocks nothing, a late answer included."""
        return Action.ALLOW if self.mode is Mode.MONITOR else self.on_timeout

    @cached_property
    def verdict_digest(self) -> str:
        """What cached verdicts are bound to: ``digest`` of the document without ``mode``.
        A verdict is the verifier's answer under the trust, whatever the mode makes of it,
        so a mode switch (break-glass) keeps a warm cache; any other change re-verifies."""
        doc = json.loads(self.canonical)
        doc.pop("mode", None)
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

    @property
    def caller_dependent(self) -> bool:
        """Some rule matches on more than the file's bytes: the exec'ing process (uids,
        gids), or the file's owner, which chown changes without clearing a fanotify ignore
        mark. Then an allow must not be cached per file, or a later exec would skip the
        policy."""
        return any(m.uids is not None or m.gids is not None or m.owner_uids is not None
                   or m.owner_gids is not None for m in (r.match for r in self.rules))

    @property
    def path_dependent(self) -> bool:
        """Some rule or scope tells paths apart below a watched directory: then a fanotify
        ignore mark, which stays on the inode through a rename or a new hard link, would let
        a file allowed at one path run unjudged at another. (The kernel verdict maps are
        keyed with the ctime, which a rename or link changes.)"""
        def everywhere(g: Glob) -> bool:
            return g.pattern.rstrip("/") in ("", "/**")

        def whole_dir(g: Glob) -> bool:
            root = g.root().rstrip("/")
            return g.pattern.rstrip("/") in (root, root + "/**")

        return (any(not everywhere(g) for r in self.rules for g in r.match.paths)
                or any(not whole_dir(g) for g in self.scopes))

    @property
    def file_decides(self) -> bool:
        """An allow depends on the file alone (its bytes and their signature), so fanotify
        may remember it on the inode with an ignore mark."""
        return not (self.caller_dependent or self.path_dependent)

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


def _identity_key(rule: IdentityRule) -> List[Any]:
    key: List[Any] = [rule.issuer, rule.san or "", rule.san_regex or ""]
    if rule.extensions or rule.extensions_regex:  # absent: the digest of older policies holds
        key += [[list(p) for p in rule.extensions], [list(p) for p in rule.extensions_regex]]
    return key


def trust_digest(trust: TrustConfig) -> str:
    """sha256 over the trust material itself (not its file names): binds cached verdicts."""
    doc = {
        "keys": sorted(k.fingerprint for k in trust.keys),
        "identities": sorted(_identity_key(r) for r in trust.identities),
        "trusted_root": (hashlib.sha256(trust.trusted_root).hexdigest()
                         if trust.trusted_root is not None else None),
        "stores": sorted(trust.store_dirs),
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
