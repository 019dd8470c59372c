"""The ``execguard verify`` command that reproduces one recorded decision.

The record names the policy by digest, not by file. Candidate policies (``--policy``, the
file the running agent reports, the installed one, the embedded default) are loaded and the
one whose digest equals the record's supplies the rule's trust: key files, keyless identity,
trusted root, signature stores. When none matches, a key whose fingerprint the record names
is still found in the candidates' keys; anything else is a placeholder in ``<ANGLE
BRACKETS>``, listed so the reviewer knows what to fill in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

from agent.decision import Decision
from agent.errors import ExecguardError, Reason
from agent.policy import Action, PolicySnapshot
from agent.verify.model import IdentityRule, TrustConfig

# reasons the signature check itself produced: `execguard verify` says the same
SIGNATURE_REASONS = frozenset({
    Reason.NO_SIGNATURE, Reason.BAD_SIGNATURE, Reason.UNTRUSTED_KEY, Reason.UNTRUSTED_ROOT,
    Reason.IDENTITY_MISMATCH, Reason.DIGEST_MISMATCH, Reason.MALFORMED_SIGNATURE,
    Reason.CERTIFICATE_INVALID, Reason.TLOG_INVALID, Reason.UNSUPPORTED_SIGNATURE,
    Reason.NO_TRUST_CONFIGURED,
})


@dataclass
class Reproduction:
    argv: List[str]
    expected_exit: Optional[int]  # 0 trusted, 1 untrusted; None: verify cannot tell
    policy_source: Optional[str]  # the policy whose digest matched, if any
    placeholders: List[str] = field(default_factory=list)  # "<X>: what to put there"
    notes: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class Candidate:
    """A policy that may be the one that decided; ``error`` when it could not be loaded."""

    label: str
    snapshot: Optional[PolicySnapshot]
    error: Optional[str] = None


def load_candidates(
    loaders: Sequence[Tuple[str, Callable[[], Optional[PolicySnapshot]]]]
) -> List[Candidate]:
    """Each loader returns a snapshot, None (nothing there) or raises ExecguardError."""
    out: List[Candidate] = []
    for label, load in loaders:
        try:
            snap = load()
        except ExecguardError as exc:
            out.append(Candidate(label, None, str(exc)))
            continue
        if snap is not None:
            out.append(Candidate(label, snap))
    return out


def expected_exit(d: Decision) -> Optional[int]:
    if d.reason in SIGNATURE_REASONS:
        return 1
    if d.reason is Reason.GO_PREDICATE or (d.reason is Reason.OK and d.evidence is not None):
        return 0
    return None  # decided by a rule without a signature check, or verification failed


def _pick_identity(ids: Sequence[IdentityRule], d: Decision) -> Optional[IdentityRule]:
    ev = d.evidence
    if ev is not None and ev.identity and ev.issuer:
        for rule in ids:
            if rule.matches(ev.identity, ev.issuer):
                return rule
    return ids[0] if ids else None


def _trust_args(trust: TrustConfig, d: Decision, notes: List[str]) -> List[str]:
    argv: List[str] = []
    for src in dict.fromkeys(k.source for k in trust.keys):
        argv += ["--key", src]
    ident = _pick_identity(trust.identities, d)
    if ident is not None:
        argv += (["--identity", ident.san] if ident.san is not None
                 else ["--identity-regex", ident.san_regex or ""])
        argv += ["--issuer", ident.issuer]
        if len(trust.identities) > 1:
            notes.append(f"the rule trusts {len(trust.identities)} keyless identities; "
                         f"verify takes one, so only {ident.describe()} is given")
    if trust.trusted_root_source:
        argv += ["--trusted-root", trust.trusted_root_source]
    for store in trust.store_dirs:
        argv += ["--store", store]
    return argv


def _from_policy(snap: PolicySnapshot, d: Decision, notes: List[str]) -> List[str]:
    rule = snap.rule(d.rule_id) if d.rule_id else None
    trust = snap.trust
    if rule is not None:
        if rule.action is not Action.REQUIRE_SIGNATURE:
            notes.append(f"rule {rule.rule_id} is '{rule.action.value}': it decided without "
                         f"a signature check; verify shows the signature state only")
        elif rule.trust is not None:
            trust = rule.trust
        if rule.module_pins:
            notes.append(f"rule {rule.rule_id} pins signers per Go module; verify checks "
                         f"the rule's signers, not the pin")
    elif d.rule_id:
        notes.append(f"rule {d.rule_id!r} is not in {snap.source}")
    return _trust_args(trust, d, notes)


def _by_fingerprint(cands: Sequence[Candidate], fingerprint: str) -> Optional[str]:
    for c in cands:
        if c.snapshot is None:
            continue
        keys = list(c.snapshot.trust.keys)
        for rule in c.snapshot.rules:
            keys += list(rule.trust.keys) if rule.trust else []
        for key in keys:
            if key.fingerprint == fingerprint:
                return key.source
    return None


def reproduce(d: Decision, candidates: Sequence[Candidate],
              program: str = "execguard") -> Reproduction:
    notes: List[str] = []
    placeholders: List[str] = []
    argv = [program, "verify", d.event.path]
    match = next((c for c in candidates if c.snapshot is not None and d.policy_digest
                  and c.snapshot.digest == d.policy_digest), None)
    if match is not None and match.snapshot is not None:
        argv += _from_policy(match.snapshot, d, notes)
        return Reproduction(argv, expected_exit(d), match.label, placeholders, notes)
    tried = ", ".join(c.label + (f" ({c.error})" if c.error else "") for c in candidates)
    notes.append(f"the policy that decided (digest {d.policy_digest or 'not recorded'}) "
                 f"was not found among: {tried or 'no candidates'}; use --policy FILE")
    ev = d.evidence
    if ev is not None and ev.key_fingerprint:
        src = _by_fingerprint(candidates, ev.key_fingerprint)
        if src is not None:
            argv += ["--key", src]
            notes.append(f"{src} has the recorded key fingerprint")
        else:
            argv += ["--key", "<TRUSTED-KEY.pem>"]
            placeholders.append(f"<TRUSTED-KEY.pem>: the public key with fingerprint "
                                f"{ev.key_fingerprint}")
    elif ev is not None and ev.identity and ev.issuer:
        argv += ["--identity", ev.identity, "--issuer", ev.issuer,
                 "--trusted-root", "<TRUSTED-ROOT.json>"]
        placeholders.append("<TRUSTED-ROOT.json>: the trusted_root.json the policy pins")
    else:
        argv += ["--key", "<TRUSTED-KEY.pem>"]
        placeholders.append("<TRUSTED-KEY.pem>: a public key the policy trusts (or "
                            "--identity/--issuer/--trusted-root for keyless signers)")
    return Reproduction(argv, expected_exit(d), None, placeholders, notes)
