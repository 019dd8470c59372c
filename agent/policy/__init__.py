"""The execguard policy: load and validate once, evaluate purely, decide with a verifier.

Typical use by the daemon::

    store = PolicyStore(apply_overrides(load_policy(path) if path else default_policy(),
                                        mode=args.mode, scopes=args.scope, keys=args.key))
    snapshot = store.current.snapshot            # once per decision
    outcome = decide(snapshot, subject_of(artifact, event.uid, gid=event.gid), verify_fn)
    if outcome.blocks: ...         # deny (the deciding rule's mode is enforce)
"""

from __future__ import annotations

from agent.policy.evaluate import Outcome, PolicyResult, VerifyFn, decide, evaluate
from agent.policy.load import apply_overrides, default_policy, load_policy, parse_policy
from agent.policy.model import (
    Action,
    Mode,
    PolicySnapshot,
    PolicyViolation,
    Predicate,
    Rule,
    Subject,
    trust_digest,
)
from agent.policy.predicates import AllOf, AnyOf
from agent.policy.store import Generation, PolicyStore
from agent.policy.subject import subject_of

__all__ = [
    "Action",
    "AllOf",
    "AnyOf",
    "Generation",
    "Mode",
    "Outcome",
    "PolicyResult",
    "PolicySnapshot",
    "PolicyStore",
    "PolicyViolation",
    "Predicate",
    "Rule",
    "Subject",
    "VerifyFn",
    "apply_overrides",
    "decide",
    "default_policy",
    "evaluate",
    "load_policy",
    "parse_policy",
    "subject_of",
    "trust_digest",
]
