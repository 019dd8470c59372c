"""Signed policy bundles in the running agent (docs/bundles.md).

A bundle is applied only when enough distinct pinned policy keys signed it, its version is
above the one in force (persisted in the state directory, so also across restarts) and it
has not expired. Anything else is refused with its reason and the current policy stays.
Bundles arrive three ways: ``execguard policy apply`` (control verb ``policy-apply``), the
drop directory (scanned at start and on SIGHUP), and ``execguard run --policy BUNDLE``. The
last applied bundle is kept and a restarted agent comes back on it, re-verified; an expired
one keeps enforcing and raises an alarm (never fail open).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from agent.errors import ExecguardError, InputError
from agent.fileio import check_root_owned
from agent.policy.bundle import (
    format_time,
    looks_like_bundle,
    parse_envelope_bytes,
    parse_payload,
    read_bundle_file,
)
from agent.policy.bundle_verify import (
    BundleCheck,
    BundleReason,
    check_bundle,
    check_threshold,
    load_pinned,
)
from agent.policy.model import PolicySnapshot
from agent.policy.rollback import Applied, AppliedStore
from agent.record.audit_format import AgentEvent, policy_bundle

if TYPE_CHECKING:
    from agent.daemon import Agent, RunOptions

DEFAULT_STATE_DIR = "/var/lib/execguard"  # the policy schema's state_dir default
DROP_SUFFIXES = (".bundle", ".json")
HISTORY_FILE = "policy-bundles.jsonl"
CHECK_EVERY_S = 1.0


@dataclass(frozen=True)
class InForce:
    """The bundle whose policy the agent enforces."""

    version: int
    digest: str
    issued_at: datetime
    expires: datetime
    source: str
    signers: Tuple[str, ...]

    def to_json(self, now: datetime) -> Dict[str, Any]:
        return {"version": self.version, "digest": self.digest,
                "issued_at": format_time(self.issued_at), "expires": format_time(self.expires),
                "expires_in_s": int((self.expires - now).total_seconds()),
                "source": self.source, "signers": list(self.signers)}


def _in_force(check: BundleCheck, source: str) -> InForce:
    b = check.bundle
    assert b is not None and check.digest is not None and check.signatures is not None
    return InForce(b.version, check.digest, b.issued_at, b.expires, source,
                   check.signatures.valid)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class BundleManager:
    """Owns the bundle state of one agent; every apply is serialized by one lock."""

    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.keys_dir = opts.policy_keys
        self.threshold = opts.policy_threshold
        self.drop_dir = opts.policy_drop_dir
        self.warn_s = opts.policy_expiry_warning
        self.state_dir = opts.state_dir or DEFAULT_STATE_DIR
        self.store = AppliedStore(self.state_dir)
        self.in_force: Optional[InForce] = None
        self.last: Optional[Dict[str, Any]] = None  # the last apply or reject, for status
        self.agent: Optional[Agent] = None
        # records and console lines from before the recorder existed: (event, line, text)
        self._early: List[Tuple[Optional[AgentEvent], Optional[Dict[str, Any]], str]] = []
        self._lock = threading.Lock()
        self._next_check = 0.0
        self._warned: Optional[str] = None  # digest warned about (expiring)
        self._alarmed: Optional[str] = None  # digest alarmed about (expired)

    # -- start ----------------------------------------------------------------------------
    def initial(self, load_plain: Callable[[], PolicySnapshot]) -> PolicySnapshot:
        """The policy to start on: the applied bundle (re-verified), a newer one from
        ``--policy`` or the drop directory, else the plain policy file or the default."""
        policy = self.opts.policy
        bundle_arg = policy if policy and looks_like_bundle(_peek(policy)) else None
        plain = None if bundle_arg else load_plain()
        if self.opts.state_dir is None and plain is not None:
            self.state_dir = plain.state_dir
            self.store = AppliedStore(self.state_dir)
        applied = self.store.load()
        current: Optional[PolicySnapshot] = None
        if applied is not None:
            current = self._restore(applied)
        candidates = ([bundle_arg] if bundle_arg else []) + self._drop_candidates()
        for path in candidates:  # each one is judged against what the previous applied
            snap = self._try(path, "start", early=True, explicit=path == bundle_arg,
                             drop=path != bundle_arg)
            if snap is not None:
                current = snap
        if current is None and bundle_arg is not None:
            why = self.last["detail"] if self.last else "not applied"
            raise ExecguardError(f"--policy {bundle_arg}: bundle refused: {why}")
        if current is None:
            assert plain is not None
            return plain
        if plain is not None and self.opts.policy:
            self._say(f"the signed bundle in force stays over --policy {self.opts.policy}")
        if self.opts.mode or self.opts.scopes or self.opts.keys:
            self._say("WARNING: --mode, --scope and --key do not override a signed policy "
                      "bundle; they are ignored while one is in force")
        return current

    def _restore(self, applied: Applied) -> Optional[PolicySnapshot]:
        """The kept bundle, re-verified (an expired one still counts: never fail open)."""
        path = self.store.bundle_path
        data = self.store.load_bundle()
        if data is None:
            check, snap = BundleCheck(BundleReason.MALFORMED, "missing",
                                      threshold=self.threshold), None
        else:
            check, snap = self._check(data, path, None, early=True)
        b = check.bundle
        if data is not None and snap is not None and b is not None and check.digest and \
                check.digest != applied.digest and b.version > applied.version and \
                check.reason in (BundleReason.OK, BundleReason.EXPIRED):
            # the agent stopped between keeping the bundle and recording it (commit order:
            # current.bundle, then applied.json): it verified then and again now, and it is
            # newer, so finish that commit rather than fall back to the plain policy
            try:
                applied = self.store.commit(data, b.version, check.digest)
            except OSError as exc:
                raise ExecguardError(f"{self.store.state_path}: cannot complete the "
                                     f"interrupted commit of v{b.version}: "
                                     f"{exc.strerror or exc}") from None
            self._say(f"policy bundle v{b.version}: completed a commit interrupted by a stop")
        if check.digest != applied.digest and snap is not None:
            check = BundleCheck(BundleReason.MALFORMED, f"is not the applied bundle "
                                f"{applied.digest}", check.digest, check.bundle,
                                threshold=self.threshold)
        if check.digest != applied.digest or snap is None or \
                check.reason not in (BundleReason.OK, BundleReason.EXPIRED):
            self._note(check, path, "restore", early=True)
            self._say(f"WARNING: the applied bundle v{applied.version} cannot be restored "
                      f"({check.reason.value}: {check.detail}); starting on the configured "
                      "policy")
            return None
        self.in_force = _in_force(check, self.store.bundle_path)
        self._say(f"policy bundle v{applied.version} restored from {self.store.bundle_path}")
        return snap

    # -- wiring ---------------------------------------------------------------------------
    def attach(self, agent: Agent) -> None:
        """Register the control verb, the expiry ticker and the status section; emit the
        records of what happened before the recorder existed."""
        self.agent = agent
        agent.commands["policy-apply"] = self.handle_apply
        agent.status_sections.append(self.decorate)
        agent.tickers.append(self.tick)
        for event, line, text in self._early:
            self._emit(event, line, text)
        self._early.clear()

    def on_sighup(self) -> bool:
        """Look in the drop directory; True when bundles govern (the file reload is skipped:
        a plain file must never replace a signed policy)."""
        applied_any = False
        try:
            for path in self._drop_candidates():
                if self._try(path, "drop-dir", drop=True) is not None:
                    applied_any = True
                    break
        except (ExecguardError, OSError) as exc:  # e.g. the pinned key directory is gone
            self._say(f"WARNING: policy bundles: {exc}; the current policy stays")
        if not applied_any and self.in_force is not None:
            self._say(f"SIGHUP: no newer policy bundle in {self.drop_dir}; "
                      f"v{self.in_force.version} stays")
        return applied_any or self.in_force is not None

    def handle_apply(self, request: Dict[str, Any]) -> Dict[str, Any]:
        path = request.get("bundle")
        if not isinstance(path, str) or not path.startswith("/"):
            return {"error": "policy-apply needs 'bundle': the absolute path of a bundle file"}
        try:
            self._try(path, "control", explicit=True)
        except ExecguardError as exc:
            return {"error": str(exc)}
        except OSError as exc:  # the state directory could not keep it: not applied
            return {"error": f"{self.store.directory}: {exc.strerror or exc}; not applied"}
        return dict(self.last or {"error": "nothing recorded"})

    # -- apply ----------------------------------------------------------------------------
    def _check(self, data: bytes, source: str, min_version: Optional[int], early: bool = False
               ) -> Tuple[BundleCheck, Optional[PolicySnapshot]]:
        pinned = load_pinned(self.keys_dir)
        check_threshold(self.threshold, pinned, f"--policy-keys {self.keys_dir}")
        agent = self.agent
        log_dir = self.opts.log_dir if early or agent is None else agent.snapshot.log_dir
        return check_bundle(data, source, pinned, self.threshold, _now(), min_version,
                            self.state_dir, log_dir)

    def _try(self, path: str, origin: str, early: bool = False, explicit: bool = False,
             drop: bool = False) -> Optional[PolicySnapshot]:
        """Verify and, when accepted, commit and install ``path``; None when refused.
        ``drop``: a drop-directory file, taken only as root's own (no symlink, not
        writable by others)."""
        with self._lock:
            applied = self.store.load()
            try:
                data = read_bundle_file(path, root_only=drop)
            except InputError as exc:
                check = BundleCheck(BundleReason.MALFORMED, str(exc), threshold=self.threshold)
                self._note(check, path, origin, early)
                return None
            min_version = applied.version + 1 if applied is not None else None
            check, snap = self._check(data, path, min_version, early)
            same = applied is not None and check.digest == applied.digest
            if (same and (early or not explicit)) or (
                    not explicit and check.reason is BundleReason.ROLLBACK):
                return None  # the bundle already in force, or an old drop-dir file
            if not check.accepted or snap is None:
                self._note(check, path, origin, early)
                return None
            assert check.bundle is not None and check.digest is not None
            self.store.commit(data, check.bundle.version, check.digest)  # OSError: not applied
            old = self._old()
            self.in_force = _in_force(check, path)
            self._warned = self._alarmed = None
            if not early:
                assert self.agent is not None
                self.agent.install_policy(snap)
            self._note(check, path, origin, early, old, snap)
            return snap

    def _old(self) -> Tuple[Optional[int], Optional[str]]:
        if self.in_force is not None:
            return self.in_force.version, self.in_force.digest
        if self.agent is not None:
            snap = self.agent.base_snapshot
            return snap.version, snap.digest
        return None, None

    def _note(self, check: BundleCheck, path: str, origin: str, early: bool,
              old: Optional[Tuple[Optional[int], Optional[str]]] = None,
              snap: Optional[PolicySnapshot] = None) -> None:
        old_version, old_digest = old if old is not None else self._old()
        line = dict(check.to_json(), time=format_time(_now()), file=path, origin=origin,
                    applied=check.accepted, old_version=old_version, old_digest=old_digest,
                    policy_digest=snap.digest if snap is not None else None)
        self.last = line
        event = policy_bundle(check.accepted, check.reason.value, old_version, old_digest,
                              check.version, check.digest, path, check.detail)
        verb = "applied" if check.accepted else f"REFUSED ({check.reason.value})"
        text = (f"policy bundle {verb}: {path} version {check.version} "
                f"(was {old_version}): {check.detail}")
        if early or self.agent is None:
            self._early.append((event, line, text))
        else:
            self._emit(event, line, text)

    def _emit(self, event: Optional[AgentEvent], line: Optional[Dict[str, Any]],
              text: str) -> None:
        agent = self.agent
        assert agent is not None
        if event is not None and agent.recorder is not None:
            agent.recorder.agent_event(event)
        agent.say(text)
        if line is None:
            return
        try:  # the agent's own record, beside the decision log; rare, so written directly
            log = os.path.join(agent.snapshot.log_dir, HISTORY_FILE)
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            with os.fdopen(fd, "a") as fh:
                fh.write(json.dumps(line, sort_keys=True, default=str) + "\n")
        except OSError as exc:
            agent.say(f"WARNING: cannot write {HISTORY_FILE}: {exc}")

    def _say(self, text: str) -> None:
        if self.agent is not None:
            self.agent.say(text)
        else:
            self._early.append((None, None, text))

    def _drop_candidates(self) -> List[str]:
        """Bundle files in the drop directory, highest (claimed) version first."""
        try:
            names = os.listdir(self.drop_dir)
            check_root_owned(self.drop_dir, os.stat(self.drop_dir))
        except OSError:
            return []
        except InputError as exc:  # whoever can write there could pick what root applies
            self._say(f"WARNING: policy drop directory ignored: {exc}")
            return []
        found: List[Tuple[int, str]] = []
        for name in names:
            if name.startswith(".") or not name.endswith(DROP_SUFFIXES):
                continue
            path = os.path.join(self.drop_dir, name)
            try:
                data = read_bundle_file(path, root_only=True)
                version = parse_payload(parse_envelope_bytes(data, path).payload, path).version
            except ExecguardError:
                version = -1  # still tried, so its rejection is recorded
            found.append((version, path))
        return [p for _, p in sorted(found, reverse=True)]

    # -- expiry ---------------------------------------------------------------------------
    def expiry_state(self, now: datetime) -> str:
        b = self.in_force
        if b is None:
            return "none"
        if now >= b.expires:
            return "expired"
        if (b.expires - now).total_seconds() <= self.warn_s:
            return "expiring"
        return "ok"

    def tick(self, mono: float) -> None:
        if mono < self._next_check or self.in_force is None or self.agent is None:
            return
        self._next_check = mono + CHECK_EVERY_S
        b, now = self.in_force, _now()
        state = self.expiry_state(now)
        if state == "expiring" and self._warned != b.digest:
            self._warned = b.digest
            self._signal(False, f"policy bundle v{b.version} expires at "
                         f"{format_time(b.expires)}; apply a newer one")
        elif state == "expired" and self._alarmed != b.digest:
            self._alarmed = b.digest
            self._signal(True, f"ALARM: policy bundle v{b.version} expired at "
                         f"{format_time(b.expires)}; it keeps enforcing until a newer one "
                         "is applied")

    def _signal(self, expired: bool, text: str) -> None:
        b, agent = self.in_force, self.agent
        assert b is not None and agent is not None
        reason = "expired" if expired else "expiring"
        line = {"time": format_time(_now()), "event": reason, "version": b.version,
                "digest": b.digest, "expires": format_time(b.expires), "detail": text}
        self._emit(policy_bundle(not expired, reason, b.version, b.digest, b.version,
                                 b.digest, b.source, text), line, f"WARNING: {text}"
                   if not expired else text)

    def decorate(self, status: Dict[str, Any]) -> None:
        """Add ``policy_bundle`` to a status reply; ``alarm`` once the bundle expired."""
        now = _now()
        state = self.expiry_state(now)
        section: Dict[str, Any] = {
            "in_force": self.in_force.to_json(now) if self.in_force else None,
            "expiry": state, "warn_before_s": self.warn_s, "keys_dir": self.keys_dir,
            "threshold": self.threshold, "drop_dir": self.drop_dir, "last": self.last}
        status["policy_bundle"] = section
        b = self.in_force
        if b is not None and state == "expiring":
            status.setdefault("warnings", []).append(
                f"policy bundle v{b.version} expires at {format_time(b.expires)}")
        elif b is not None and state == "expired":
            if status.get("state") != "starting":
                status["state"] = "alarm"
            status.setdefault("warnings", []).append(
                f"ALARM: policy bundle v{b.version} expired at {format_time(b.expires)}; "
                "still enforcing it")


def _peek(path: str) -> bytes:
    try:
        return read_bundle_file(path)
    except ExecguardError:
        return b""  # the plain loader reports the problem
