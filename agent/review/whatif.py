"""What-if: how a candidate policy would have decided the execs in the decision log.

Each record becomes the policy ``Subject`` it was decided as (path, uid, the Go build summary
the log keeps), and the candidate decides it through ``agent.policy.decide``. The one impure
step, signature verification, is answered from what the record proves instead of the file:
a signature that verified for those bytes (sha256 recorded) when the exec happened, by the
signer the record names. Whatever the log cannot support is ``unknown``, with the reason:
an allow is only ever claimed for a signer the candidate trusts and whose signature is known
to have verified. ``--reverify`` replaces the inference by the real verifier when the file is
still on disk, unchanged.

Why some facts need the *recorded* policy (found by digest among the policies the caller
knows): a failed check proves nothing about signers the recorded policy did not trust, and
a keyless or transparency-logged signature proves nothing under another trusted root.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from enum import Enum
from typing import Any, Dict, FrozenSet, Iterable, Optional, Set, Tuple

from agent.decision import Decision, Source
from agent.digest import Artifact
from agent.errors import InputError, Reason
from agent.goinfo.model import BuildInfo, Module
from agent.policy import (
    Action,
    PolicySnapshot,
    PolicyViolation,
    Predicate,
    Rule,
    Subject,
    decide,
    evaluate,
    subject_of,
    trust_digest,
)
from agent.policy.model import SignerSpec
from agent.policy.predicates import (
    AllOf,
    AnyOf,
    DenyModules,
    DenyVcsModified,
    MinGoVersion,
    SignerForModule,
)
from agent.verify import verify_artifact
from agent.verify.discovery import SUFFIXES
from agent.verify.model import Evidence, SignatureKind, TrustConfig, Verdict

# The decider's detail for an exec outside every scope (agent/decide.py): no subject was built.
OUT_OF_SCOPE_DETAIL = "outside every scope"
# Reasons the signature check produced when no trusted signature was found.
FAILED_SIGNATURE = frozenset({
    Reason.BAD_SIGNATURE, Reason.UNTRUSTED_KEY, Reason.UNTRUSTED_ROOT,
    Reason.IDENTITY_MISMATCH, Reason.DIGEST_MISMATCH, Reason.MALFORMED_SIGNATURE,
    Reason.CERTIFICATE_INVALID, Reason.TLOG_INVALID, Reason.UNSUPPORTED_SIGNATURE,
    Reason.NO_TRUST_CONFIGURED,
})
# Recorded reasons that come only after a signature was verified (UNVERIFIED replaces an
# allow made after the exec was already stopped, so its evidence was trusted too).
VERIFIED_REASONS = frozenset({Reason.OK, Reason.GO_PREDICATE, Reason.UNVERIFIED})


class Change(str, Enum):
    SAME = "same"
    NEWLY_DENIED = "newly-denied"
    NEWLY_ALLOWED = "newly-allowed"
    UNKNOWN = "unknown"


class Method(str, Enum):
    """What produced a what-if verdict."""

    POLICY = "policy"  # scope, limits or an allow/deny rule: nothing to verify
    RECORDED = "recorded-evidence"  # the signature evidence and Go build summary in the log
    REVERIFIED = "reverified"  # the real verifier on the file, unchanged since the exec


class Gap(str, Enum):
    """Why a verdict is unknown: the stable codes of ``--json`` and the docs."""

    NO_SIGNATURE_EVIDENCE = "no-signature-evidence"
    NEW_SIGNERS = "new-signers"
    NEW_STORES = "new-signature-stores"
    SIGNATURE_LOCATION = "signature-location"
    TRUSTED_ROOT = "trusted-root"
    NO_BUILD_INFO = "no-build-info"
    GO_DEPENDENCIES = "go-dependencies"
    GO_FIELD = "go-field-missing"
    PREDICATE = "predicate-unsupported"
    MATCH_FIELD = "match-field-missing"
    NOT_DECIDED = "not-decided"
    BAD_RECORD = "bad-record"


@dataclass(frozen=True)
class Replayed:
    """The candidate's verdict for one record: ``allow`` is None when unknown (then
    ``reason`` is a ``Gap`` code)."""

    allow: Optional[bool]
    reason: str
    detail: str
    rule_id: Optional[str]
    method: Method
    note: Optional[str] = None  # e.g. why --reverify could not be used
    mode: Optional[str] = None  # the effective mode of what decided (a rule can be monitor)

    @property
    def blocks(self) -> bool:
        return self.allow is False and self.mode == "enforce"

    @property
    def verdict(self) -> str:
        return "unknown" if self.allow is None else "allow" if self.allow else "deny"


def change_of(recorded_allow: bool, replayed: Replayed) -> Change:
    if replayed.allow is None:
        return Change.UNKNOWN
    if replayed.allow == recorded_allow:
        return Change.SAME
    return Change.NEWLY_ALLOWED if replayed.allow else Change.NEWLY_DENIED


def _unknown(gap: Gap, detail: str, rule_id: Optional[str], method: Method) -> Replayed:
    return Replayed(None, gap.value, detail, rule_id, method)


# --- the subject the record was decided as ---------------------------------------------------

@dataclass(frozen=True)
class Recorded:
    """What one record tells about the file: its subject (None when the decider never built
    one) and which Go summary fields it holds."""

    subject: Optional[Subject]
    go_fields: FrozenSet[str]
    why_no_subject: str = ""


def _gid(d: Decision) -> Optional[int]:
    """The exec's gid when the record holds one (None: unknown, and never matches)."""
    gid = getattr(d.event, "gid", None)
    return gid if isinstance(gid, int) else None


def _str_or_none(go: Dict[str, Any], key: str) -> Tuple[bool, Optional[str]]:
    """(known, value): a field is known when present as a string or as JSON null."""
    if key not in go:
        return False, None
    value = go[key]
    if value is None or isinstance(value, str):
        return True, value
    return False, None


def recorded_subject(d: Decision) -> Recorded:
    ev = d.event
    gid = _gid(d)
    if d.policy_digest is None or d.detail == OUT_OF_SCOPE_DETAIL or \
            d.reason in (Reason.VERIFY_FAILED, Reason.DECISION_TIMEOUT):
        why = ("it was outside the recorded policy's scopes" if d.detail == OUT_OF_SCOPE_DETAIL
               else f"the record is a {d.reason.value} ({d.detail})"
               if d.reason in (Reason.VERIFY_FAILED, Reason.DECISION_TIMEOUT)
               else f"the record was not made by the decider ({d.detail})")
        return Recorded(None, frozenset(), why)
    go = d.go
    if go is None:
        return Recorded(Subject(ev.path, ev.uid, go=False, gid=gid), frozenset())
    # Go without readable build info (broken, or only the runtime's pclntab): Go, with
    # nothing provable about the build
    if go.get("malformed") is True or go.get("evidence") == "runtime":
        return Recorded(Subject(ev.path, ev.uid, go=True, gid=gid),
                        frozenset({"go_version", "vcs.modified", "module"}))
    fields: Set[str] = set()
    known, version = _str_or_none(go, "go_version")
    if known and version is not None:
        fields.add("go_version")
    known, modified = _str_or_none(go, "vcs.modified")
    if known:
        fields.add("vcs.modified")
    known_mod, module = _str_or_none(go, "module")
    if known_mod:
        fields.add("module")
    _, mod_version = _str_or_none(go, "version")
    _, main_path = _str_or_none(go, "path")
    _, no_modules = _str_or_none(go, "no_module_info")
    info = BuildInfo(
        go_version=version or "",
        path=main_path or "",
        main=Module(module, mod_version or "") if module else None,
        settings=(("vcs.modified", modified),) if modified is not None else (),
        no_module_info=no_modules or "",
    )
    return Recorded(Subject(ev.path, ev.uid, go=True, buildinfo=info, gid=gid),
                    frozenset(fields))


# --- Go predicates on a build summary: pass, fail, or unknown ---------------------------------

@dataclass(frozen=True)
class Check:
    state: str  # "pass" | "fail" | "unknown"
    reason: Reason = Reason.GO_PREDICATE
    detail: str = ""
    gap: Gap = Gap.GO_FIELD


_PASS = Check("pass")


def _leaf(pred: Predicate, subject: Subject) -> Check:
    try:
        pred.check(subject)
    except PolicyViolation as exc:
        return Check("fail", exc.reason, exc.detail)
    except Exception as exc:  # as in decide: a predicate bug denies
        return Check("fail", Reason.GO_PREDICATE, f"predicate failed: {type(exc).__name__}: "
                     f"{exc}")
    return _PASS


def check_predicate(pred: Predicate, subject: Subject, fields: FrozenSet[str]) -> Check:
    """Like ``pred.check(subject)`` on the full build info, where the summary allows."""
    if isinstance(pred, (AllOf, AnyOf)):
        results = [check_predicate(p, subject, fields) for p in pred.predicates]
        if not results:
            return Check("fail", detail=f"empty {type(pred).__name__}: nothing to satisfy")
        fails = [r for r in results if r.state == "fail"]
        unknowns = [r for r in results if r.state == "unknown"]
        if isinstance(pred, AllOf):
            return fails[0] if fails else unknowns[0] if unknowns else _PASS
        if any(r.state == "pass" for r in results):
            return _PASS
        return unknowns[0] if unknowns else Check(
            "fail", fails[0].reason, "; ".join(f.detail for f in fails))
    if not isinstance(pred, (MinGoVersion, DenyVcsModified, SignerForModule, DenyModules)):
        return Check("unknown", detail=f"{type(pred).__name__} ({pred.describe()}) cannot be "
                     f"checked from the log", gap=Gap.PREDICATE)
    if subject.go and subject.buildinfo is None:
        return _leaf(pred, subject)  # unreadable build info: every Go predicate fails
    needs = {MinGoVersion: "go_version", DenyVcsModified: "vcs.modified",
             SignerForModule: "module"}
    for kind, field in needs.items():
        if isinstance(pred, kind):
            if field not in fields:
                return Check("unknown", detail=f"{pred.describe()}: the log holds no {field} "
                             f"for this binary", gap=Gap.GO_FIELD)
            return _leaf(pred, subject)
    result = _leaf(pred, subject)  # DenyModules on the main module alone: a hit is certain
    if result.state == "fail":
        return result
    if "module" not in fields:
        return Check("unknown", detail="the log holds no main module", gap=Gap.GO_FIELD)
    return Check("unknown", detail=f"{pred.describe()}: the log records the main module "
                 f"only, not the dependencies or replace directives", gap=Gap.GO_DEPENDENCIES)


# --- signatures: what the record proves ------------------------------------------------------

def _trusted_evidence(d: Decision) -> Optional[Evidence]:
    if d.evidence is None or d.sha256 is None or d.reason not in VERIFIED_REASONS:
        return None
    if d.source not in (Source.VERIFY, Source.CACHE):
        return None
    return d.evidence


def _needs_root(ev: Evidence) -> bool:
    """Keyless certificates and transparency-log entries are checked against the root."""
    return (ev.kind is SignatureKind.BUNDLE_KEYLESS or ev.key_fingerprint is None
            or ev.log_index is not None or ev.integrated_time is not None)


def _found_by(ev: Evidence, path: str, trust: TrustConfig) -> bool:
    """Would discovery find the recorded signature file under this trust?"""
    if ev.source in {path + s for s in SUFFIXES}:
        return True
    stores = {s.rstrip("/") or "/" for s in trust.store_dirs}
    return os.path.dirname(ev.source) in stores


def _within(new: TrustConfig, old: TrustConfig) -> bool:
    """Every signer and place ``new`` trusts, ``old`` trusted too (so what failed under
    ``old`` fails under ``new``)."""
    old_fps = {k.fingerprint for k in old.keys}
    return ({k.fingerprint for k in new.keys} <= old_fps
            and all(i in old.identities for i in new.identities)
            and (new.trusted_root is None or new.trusted_root == old.trusted_root)
            and set(new.store_dirs) <= set(old.store_dirs))


def _signer(ev: Evidence) -> str:
    if ev.key_fingerprint:
        return f"key {ev.key_fingerprint}"
    return f"{ev.identity} from {ev.issuer}"


class _FromRecord:
    """A ``verify_fn`` for ``decide`` that answers from the record; sets ``gap`` instead of
    guessing when the record cannot answer for this trust."""

    def __init__(self, d: Decision, old_trust: Optional[TrustConfig]) -> None:
        self.d = d
        self.old = old_trust
        self.gap: Optional[Tuple[Gap, str]] = None

    def _miss(self, gap: Gap, detail: str) -> Verdict:
        self.gap = (gap, detail)
        return Verdict.fail(Reason.VERIFY_FAILED, detail)

    def __call__(self, trust: TrustConfig) -> Verdict:
        d = self.d
        ev = _trusted_evidence(d)
        if ev is not None:
            return self._evidence(ev, trust)
        if d.reason is Reason.NO_SIGNATURE and d.sha256 is not None:
            if not trust.store_dirs or (self.old is not None and
                                        set(trust.store_dirs) <= set(self.old.store_dirs)):
                return Verdict.fail(Reason.NO_SIGNATURE, "no signature was found beside the "
                                    "file or in a store the candidate also lists")
            return self._miss(Gap.NEW_STORES, "no signature was found then, but the candidate "
                              "looks in signature stores the recorded policy did not (or "
                              "the recorded policy is not known)")
        if d.reason in FAILED_SIGNATURE and d.sha256 is not None:
            if self.old is not None and _within(trust, self.old):
                return Verdict.fail(d.reason, f"as recorded: {d.detail}", d.evidence)
            return self._miss(Gap.NEW_SIGNERS, f"the signature check failed then ({d.reason.value})"
                              f"; the candidate trusts signers or places the recorded policy "
                              f"did not (or that policy is not known), and the log records no "
                              f"verified signer to check them against")
        return self._miss(Gap.NO_SIGNATURE_EVIDENCE, "the candidate requires a signature, and "
                          "the log records no verified signature for this exec "
                          f"(recorded: {d.reason.value}, {d.detail})")

    def _evidence(self, ev: Evidence, trust: TrustConfig) -> Verdict:
        path = self.d.event.path
        if not _found_by(ev, path, trust):
            return self._miss(Gap.SIGNATURE_LOCATION, f"the recorded signature {ev.source} is "
                              f"in a signature store the candidate does not list")
        if _needs_root(ev):
            if trust.trusted_root is None:
                return Verdict.fail(Reason.NO_TRUST_CONFIGURED, f"the recorded {ev.kind.value} "
                                    f"signature needs a trusted_root.json; the candidate has "
                                    f"none", ev)
            if self.old is None or self.old.trusted_root != trust.trusted_root:
                return self._miss(Gap.TRUSTED_ROOT, f"the recorded {ev.kind.value} signature "
                                  f"was checked against the recorded policy's trusted root, "
                                  f"and the candidate's cannot be shown to be the same")
        if SignerSpec(trust.keys, trust.identities).accepts(ev):
            return Verdict.ok(ev, f"recorded signature by {_signer(ev)} ({ev.source}) verified "
                              f"for sha256 {self.d.sha256} when the exec happened")
        reason = Reason.UNTRUSTED_KEY if ev.key_fingerprint else Reason.IDENTITY_MISMATCH
        return Verdict.fail(reason, f"signed by {_signer(ev)} ({ev.source}), a signer the "
                            f"candidate does not trust (only this signature is in the log)", ev)


# --- one record ------------------------------------------------------------------------------

def _strip_predicates(snap: PolicySnapshot) -> PolicySnapshot:
    """Predicates run on partial build info here (``check_predicate``), not in ``decide``."""
    return dataclasses.replace(snap, rules=tuple(dataclasses.replace(r, predicate=None)
                                                 for r in snap.rules))


# Match conditions on facts the log does not keep: (Match field, Subject field).
_UNRECORDED = (("gids", "gid"), ("owner_uids", "owner_uid"), ("owner_gids", "owner_gid"))


def rule_walk(snap: PolicySnapshot, subject: Subject, go_known: bool
              ) -> Tuple[bool, Optional[Rule], str]:
    """(determined, rule, missing): the first rule that applies, found without guessing.

    A condition on a fact the record lacks (build info, the exec's gid, the file's owner)
    is dropped to see whether the rule could match at all; if it could, the rule that
    applies is undetermined and ``missing`` names the facts.
    """
    variants = [subject] if go_known else [
        dataclasses.replace(subject, go=False, buildinfo=None),
        dataclasses.replace(subject, go=True, buildinfo=None)]
    for rule in snap.rules:
        m = rule.match
        loose: Dict[str, Any] = {}
        missing = []
        for match_field, subject_field in _UNRECORDED:
            if getattr(m, match_field, None) is not None and \
                    getattr(subject, subject_field, None) is None:
                loose[match_field] = None
                missing.append(f"match.{match_field} (the log has no {subject_field})")
        if not go_known and m.module is not None:
            loose["module"] = None
        if not go_known and (m.go is not None or m.module is not None):
            missing.append("match.go/match.module (the log has no build info for this exec)")
        relaxed = dataclasses.replace(m, **loose) if loose else m
        if not any(relaxed.matches(v) for v in variants):
            continue  # certainly not this rule
        if not loose and all(m.matches(v) for v in variants):
            return True, rule, ""
        return False, rule, "; ".join(missing)
    return True, None, ""


class Replayer:
    """Replays records against one candidate; ``recorded`` maps policy digests to the policies
    that may have made them."""

    def __init__(self, candidate: PolicySnapshot,
                 recorded: Optional[Dict[str, PolicySnapshot]] = None,
                 reverify: bool = False) -> None:
        self.candidate = candidate
        self.stripped = _strip_predicates(candidate)
        self.recorded = dict(recorded or {})
        self.reverify = reverify
        self._memo: Dict[Any, Replayed] = {}
        self._hashes: Dict[Tuple[int, int, int, int], str] = {}

    def replay(self, d: Decision) -> Replayed:
        key = _memo_key(d)
        hit = self._memo.get(key)
        if hit is None:
            try:
                hit = self._replay(d)
            except Exception as exc:  # a record this code cannot handle is never an allow
                hit = _unknown(Gap.BAD_RECORD, f"cannot replay this record: "
                               f"{type(exc).__name__}: {exc}", d.rule_id, Method.RECORDED)
            if len(self._memo) > 200_000:
                self._memo.clear()
            self._memo[key] = hit
        return hit

    def _replay(self, d: Decision) -> Replayed:
        result = self.from_log(d)
        if self.reverify and (result.allow is None or result.method is Method.RECORDED):
            again, why_not = self._reverified(d)
            if again is not None:
                return again
            return dataclasses.replace(result, note=f"not re-verified: {why_not}")
        return result

    def from_log(self, d: Decision) -> Replayed:
        snap, ev = self.candidate, d.event
        if not ev.path.startswith("/"):
            return _unknown(Gap.BAD_RECORD, f"the recorded path {ev.path!r} is not absolute",
                            None, Method.RECORDED)
        if not snap.in_scope(ev.path):
            return Replayed(True, Reason.OK.value, f"{ev.path} is outside the candidate's scopes",
                            None, Method.POLICY, mode=snap.mode.value)
        if ev.identity.size > snap.limits.max_file_bytes:
            return Replayed(False, Reason.VERIFY_FAILED.value,
                            f"{ev.identity.size} bytes is over the candidate's max_file_bytes "
                            f"({snap.limits.max_file_bytes})", None, Method.POLICY,
                            mode=snap.mode.value)
        rec = recorded_subject(d)
        if rec.subject is None and d.reason in (Reason.VERIFY_FAILED, Reason.DECISION_TIMEOUT):
            return _unknown(Gap.NOT_DECIDED, f"the agent could not decide this exec then: "
                            f"{rec.why_no_subject}", None, Method.RECORDED)
        subject = rec.subject or Subject(ev.path, ev.uid, go=False, gid=_gid(d))
        determined, first, missing = rule_walk(snap, subject, rec.subject is not None)
        if not determined:
            rid = first.rule_id if first is not None else None
            gap = Gap.NO_BUILD_INFO if "build info" in missing else Gap.MATCH_FIELD
            why = f": {rec.why_no_subject}" if rec.subject is None else ""
            return _unknown(gap, f"whether rule {rid} applies depends on {missing}{why}",
                            rid, Method.RECORDED)
        old = self._old_trust(d, subject) if rec.subject is not None else None
        verify = _FromRecord(d, old)
        outcome = decide(self.stripped, subject, verify)
        method = Method.RECORDED if outcome.source is Source.VERIFY else Method.POLICY
        mode = outcome.mode.value
        if verify.gap is not None:
            return _unknown(verify.gap[0], verify.gap[1], outcome.rule_id, method)
        if not outcome.allow or outcome.source is not Source.VERIFY:
            return Replayed(outcome.allow, outcome.reason.value, outcome.detail,
                            outcome.rule_id, method, mode=mode)
        rule = self.candidate.rule(outcome.rule_id or "")
        if rule is None or rule.predicate is None:
            return Replayed(True, Reason.OK.value, outcome.detail, outcome.rule_id, method,
                            mode=mode)
        signed = dataclasses.replace(subject, evidence=outcome.verdict.evidence
                                     if outcome.verdict is not None else None)
        check = check_predicate(rule.predicate, signed, rec.go_fields)
        if check.state == "pass":
            return Replayed(True, Reason.OK.value, f"{outcome.detail}; Go predicates pass "
                            f"({rule.predicate.describe()})", outcome.rule_id, method, mode=mode)
        if check.state == "fail":
            return Replayed(False, check.reason.value, check.detail, outcome.rule_id, method,
                            mode=mode)
        return _unknown(check.gap, check.detail, outcome.rule_id, method)

    def _old_trust(self, d: Decision, subject: Subject) -> Optional[TrustConfig]:
        """The trust the recorded policy checked this exec against, when that policy is known
        and still picks the recorded rule."""
        old = self.recorded.get(d.policy_digest or "")
        if old is None:
            return None
        result = evaluate(old, subject)
        if result.action is not Action.REQUIRE_SIGNATURE or result.rule_id != d.rule_id:
            return None
        return result.requires

    # --- --reverify: the real verifier on the unchanged file ---------------------------------

    def _reverified(self, d: Decision) -> Tuple[Optional[Replayed], str]:
        ev = d.event
        try:
            art = Artifact.open(ev.path)
        except InputError as exc:
            return None, f"cannot open it now ({exc.problem})"
        with art:
            ident = (art.dev, art.ino, art.ctime_ns, art.size)
            rec_ident = (ev.identity.dev, ev.identity.ino, ev.identity.ctime_ns,
                         ev.identity.size)
            if d.sha256 is not None:
                try:
                    now = self._hashes.get(ident) or art.sha256.hex()
                except InputError as exc:
                    return None, f"cannot read it now ({exc.problem})"
                self._hashes[ident] = now
                if now != d.sha256:
                    return None, "the file on disk has other bytes now (sha256 differs)"
                art.known_digest("sha256", bytes.fromhex(now))
            elif ident != rec_ident:
                return None, ("no sha256 was recorded and the file's identity (device, inode, "
                              "ctime, size) changed since")
            try:
                subject = subject_of(art, ev.uid, ev.path, _gid(d))
            except InputError as exc:
                return None, f"cannot read it now ({exc.problem})"
            verdicts: Dict[str, Verdict] = {}

            def verify_fn(trust: TrustConfig) -> Verdict:
                key = trust_digest(trust)
                if key not in verdicts:
                    verdicts[key] = verify_artifact(art, trust)
                return verdicts[key]

            outcome = decide(self.candidate, subject, verify_fn)
        method = Method.REVERIFIED if outcome.source is Source.VERIFY else Method.POLICY
        return Replayed(outcome.allow, outcome.reason.value, outcome.detail, outcome.rule_id,
                        method, mode=outcome.mode.value), ""


def _memo_key(d: Decision) -> Tuple[Any, ...]:
    """Everything ``_replay`` reads from a record: equal keys, equal answers."""
    ev, evid = d.event, d.evidence
    go = tuple(sorted((k, repr(v)) for k, v in (d.go or {}).items())) if d.go is not None \
        else None
    return (ev.path, ev.uid, getattr(ev, "gid", None), ev.identity, d.sha256, d.reason,
            d.detail,
            d.source, d.rule_id, d.policy_digest, evid, go)


def recorded_policies(snapshots: Iterable[PolicySnapshot]) -> Dict[str, PolicySnapshot]:
    out: Dict[str, PolicySnapshot] = {}
    for snap in snapshots:
        out.setdefault(snap.digest, snap)
    return out
