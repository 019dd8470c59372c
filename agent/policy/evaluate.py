"""Pure policy evaluation: which rule applies, and what it takes to satisfy it.

``evaluate`` never does I/O. ``decide`` adds the one impure step through the caller's
``verify_fn``, called only for a require-signature rule, and checks Go predicates only
once a signature is trusted (before that, build info is an unauthenticated claim).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from agent.decision import Source
from agent.errors import Reason
from agent.policy.model import (
    Action,
    Mode,
    PolicySnapshot,
    PolicyViolation,
    Rule,
    SignerSpec,
    Subject,
)
from agent.verify.model import TrustConfig, Verdict

VerifyFn = Callable[[TrustConfig], Verdict]


@dataclass(frozen=True)
class PolicyResult:
    """What the policy says before any signature is checked."""

    action: Action
    rule_id: Optional[str]  # None: no rule applied (out of scope, or fallthrough)
    reason: Reason
    detail: str
    requires: Optional[TrustConfig] = None  # require-signature: the trust to verify against
    in_scope: bool = True
    mode: Optional[Mode] = None  # the deciding rule's effective mode; None: the policy's


@dataclass(frozen=True)
class Outcome:
    """The policy's verdict. ``allow`` is the verdict in every mode; ``blocks`` says whether
    the exec must really be stopped (enforce mode and not allowed). ``mode`` is the effective
    mode: the deciding rule's (see ``Rule.effective_mode``), else the policy's."""

    allow: bool
    reason: Reason
    detail: str
    rule_id: Optional[str]
    source: Source  # RULE (allow/deny rule), VERIFY (signature checked), DEFAULT (no rule)
    mode: Mode
    verdict: Optional[Verdict] = None  # the verifier's answer, with evidence for the logs
    in_scope: bool = True  # False: outside every scope, allowed without evaluation

    @property
    def blocks(self) -> bool:
        return self.mode is Mode.ENFORCE and not self.allow


def _requires(rule: Rule, subject: Subject) -> TrustConfig:
    """The rule's trust, narrowed to the module's pinned signers when a pin applies."""
    trust = rule.trust if rule.trust is not None else TrustConfig()  # empty: trusts nobody
    module = subject.module
    for pin in rule.module_pins:
        if module is not None and pin.module.matches(module):
            signers = pin.signers.bind(module)
            return dataclasses.replace(trust, keys=signers.keys, identities=signers.identities)
    return trust


def evaluate(snapshot: PolicySnapshot, subject: Subject) -> PolicyResult:
    """The first matching rule's action (rules are ordered), else the fallthrough."""
    if not snapshot.in_scope(subject.path):
        return PolicyResult(Action.ALLOW, None, Reason.OK,
                            f"{subject.path} is outside the policy's scopes", in_scope=False)
    for rule in snapshot.rules:
        if not rule.match.matches(subject):
            continue
        mode = rule.effective_mode(snapshot.mode)
        if rule.action is Action.ALLOW:
            return PolicyResult(Action.ALLOW, rule.rule_id, Reason.OK,
                                f"allowed by {rule.where()}", mode=mode)
        if rule.action is Action.DENY:
            return PolicyResult(Action.DENY, rule.rule_id, Reason.POLICY_DENY,
                                f"denied by {rule.where()}", mode=mode)
        requires = _requires(rule, subject)
        signers = SignerSpec(requires.keys, requires.identities).describe()
        return PolicyResult(Action.REQUIRE_SIGNATURE, rule.rule_id, Reason.OK,
                            f"{rule.where()} requires a signature by {signers}", requires,
                            mode=mode)
    if snapshot.fallthrough is Action.ALLOW:
        return PolicyResult(Action.ALLOW, None, Reason.OK, "no rule matched; fallthrough allow")
    return PolicyResult(Action.DENY, None, Reason.NO_RULE, "no rule matched; fallthrough deny")


def _signer_check(trust: TrustConfig, verdict: Verdict, rule: Rule) -> Optional[str]:
    """Why a "trusted" verdict does not come from ``trust`` (a verify_fn that ignored it)."""
    if SignerSpec(trust.keys, trust.identities).accepts(verdict.evidence):
        return None
    return f"signature is not from a signer {rule.where()} trusts"


def decide(snapshot: PolicySnapshot, subject: Subject, verify_fn: VerifyFn) -> Outcome:
    """Evaluate, verify when a rule requires it, then check the rule's Go predicates.

    Never raises for a failing ``verify_fn`` or predicate: any error is a denial.
    """
    result = evaluate(snapshot, subject)

    def out(allow: bool, reason: Reason, detail: str, source: Source,
            verdict: Optional[Verdict] = None) -> Outcome:
        return Outcome(allow, reason, detail, result.rule_id, source,
                       result.mode or snapshot.mode, verdict, result.in_scope)

    if result.action is not Action.REQUIRE_SIGNATURE:
        source = Source.RULE if result.rule_id is not None else Source.DEFAULT
        return out(result.action is Action.ALLOW, result.reason, result.detail, source)
    rule = snapshot.rule(result.rule_id or "")
    if rule is None or rule.trust is None or result.requires is None:  # cannot happen
        return out(False, Reason.VERIFY_FAILED, "internal error: rule has no trust", Source.RULE)
    try:
        verdict = verify_fn(result.requires)
    except Exception as exc:  # the artifact vanished, an I/O error, a verifier bug
        return out(False, Reason.VERIFY_FAILED,
                   f"verification failed: {type(exc).__name__}: {exc}", Source.VERIFY)
    if not verdict.trusted:
        return out(False, verdict.reason, verdict.detail, Source.VERIFY, verdict)
    for trust in (result.requires, rule.trust):
        problem = _signer_check(trust, verdict, rule)
        if problem is not None:
            keyless = verdict.evidence is not None and verdict.evidence.key_fingerprint is None
            reason = Reason.IDENTITY_MISMATCH if keyless else Reason.UNTRUSTED_KEY
            return out(False, reason, problem, Source.VERIFY, verdict)
    if rule.predicate is not None:
        signed = dataclasses.replace(subject, evidence=verdict.evidence)
        try:
            rule.predicate.check(signed)
        except PolicyViolation as exc:
            return out(False, exc.reason, exc.detail, Source.VERIFY, verdict)
        except Exception as exc:  # a predicate bug must deny, not crash the decision
            return out(False, Reason.GO_PREDICATE,
                       f"predicate failed: {type(exc).__name__}: {exc}", Source.VERIFY, verdict)
    return out(True, Reason.OK, verdict.detail, Source.VERIFY, verdict)
