"""Break-glass inside the agent: control verbs, the monitor overlay, the expiry ticker.

``register(agent)`` wires it in from ``Agent.start()``. While a token is active, every
policy the agent installs (its own, a reload, a bundle) passes through ``overlay``, which
sets ``mode = monitor`` on it, so a policy swap during break-glass keeps the host in
monitor mode. Ending (expiry, ``breakglass-end``, a newer token) reinstalls the base policy.
The overlay changes nothing but the mode: the trust, rules and the trusted cache stay as
they are (``PolicySnapshot.verdict_digest`` leaves the mode out of the cache binding); the
runners drop their kernel-side allows on the way back (``policy_changed``), so nothing
allowed only in monitor mode stays allowed. Details: docs/breakglass.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

from agent.breakglass.token import (
    DEFAULT_KEYS_DIR,
    DEFAULT_MAX_SECONDS,
    DEFAULT_THRESHOLD,
    GRANT_MONITOR,
    GRANT_STOP,
    Authority,
    HostId,
    Ledger,
    Rejected,
    Token,
    claimed_nonce,
    iso,
    load_pinned_keys,
    local_host_id,
    verify,
)
from agent.errors import ExecguardError
from agent.policy import Mode, PolicySnapshot
from agent.policy.build import canonical_text
from agent.policy.bundle_verify import load_pinned
from agent.record.audit_format import AgentEvent, AgentEventKind

if TYPE_CHECKING:
    from agent.daemon import Agent

SOURCE = "control socket"


@dataclass(frozen=True)
class Active:
    token: Token
    applied_at: float  # wall clock
    deadline: float  # time.monotonic() when it ends: not_after as measured at apply


def monitor_overlay(base: PolicySnapshot, note: str) -> PolicySnapshot:
    """``base`` with ``mode = monitor``: canonical text and digest as ``apply_overrides(base,
    mode="monitor")`` gives them, but without rebuilding (which would re-read key files:
    break-glass must not change trust on the side)."""
    doc = json.loads(base.canonical)
    doc["mode"] = Mode.MONITOR.value
    text = canonical_text(doc)
    return dataclasses.replace(
        base, mode=Mode.MONITOR, canonical=text,
        digest="sha256:" + hashlib.sha256(text.encode()).hexdigest(),
        overrides=(*base.overrides, note))


class BreakGlass:
    """One per agent; thread-safe (control thread, main-loop ticker, policy installs)."""

    def __init__(self, agent: Agent, keys_dir: str = DEFAULT_KEYS_DIR,
                 max_seconds: int = DEFAULT_MAX_SECONDS, threshold: int = DEFAULT_THRESHOLD,
                 *, host: Optional[Callable[[], HostId]] = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.agent = agent
        self.keys_dir = keys_dir
        self.max_seconds = max_seconds
        self.threshold = threshold
        self.host = host or local_host_id
        self.clock, self.monotonic = clock, monotonic
        self.ledger = Ledger(agent.snapshot.state_dir)
        self.active: Optional[Active] = None
        self._lock = threading.RLock()

    # -- wiring -----------------------------------------------------------------------
    def register(self) -> None:
        agent = self.agent
        self.recover()
        agent.overlays.append(self.overlay)
        agent.tickers.append(self.tick)
        agent.commands["breakglass-apply"] = self.apply
        agent.commands["breakglass-end"] = self.end
        agent.commands["breakglass-status"] = lambda _request: self.status()
        agent.status_sections.append(lambda out: out.update(breakglass=self.status()))

    def recover(self) -> None:
        """A break-glass open in the ledger ended when its agent stopped: say so once."""
        try:
            left_open = self.ledger.open_applies()
        except ExecguardError as exc:
            self._warn(f"break-glass ledger unreadable, every apply will be refused: {exc}")
            return
        for rec in left_open:
            self._ended(str(rec.get("nonce")), "agent-restarted",
                        "the agent stopped while it was active; a restart ends break-glass")

    def overlay(self, base: PolicySnapshot) -> PolicySnapshot:
        active = self.active
        if active is None or base.mode is Mode.MONITOR:
            return base
        return monitor_overlay(base, f"break-glass {active.token.token_id} until "
                               f"{iso(active.token.not_after)}")

    # -- control verbs --------------------------------------------------------------------
    def apply(self, request: Dict[str, Any]) -> Dict[str, Any]:
        text = request.get("token")
        if not isinstance(text, str):
            return {"error": "breakglass-apply: the request needs 'token' (the token's text)"}
        with self._lock:
            try:
                token = self.admit(text.encode(errors="replace"))
            except Rejected as exc:
                self.rejected(exc, text)
                return {"error": str(exc), "rejected": exc.code}
            now = self.clock()
            previous = self.active
            self.active = Active(token, now, self.monotonic() + (token.not_after - now))
            try:
                self._install()
            except Exception as exc:  # the swap failed: the base policy is still in force
                self.active = previous
                self._ended(token.nonce, "failed", f"could not install the overlay: {exc!r}")
                return {"error": f"break-glass could not be applied: {exc}"}
            if previous is not None:
                self._ended(previous.token.nonce, "superseded",
                            f"superseded by {token.token_id}")
            self.event(AgentEventKind.BREAKGLASS_APPLY, token.nonce, (
                ("issuer", token.issuer), ("not_after", iso(token.not_after)),
                ("info", token.reason)))
            self.agent.say(f"BREAK-GLASS applied: monitor mode until {iso(token.not_after)} "
                           f"(token {token.token_id}, reason: {token.reason})")
            return {"ok": True, "breakglass": self.status()}

    def end(self, request: Dict[str, Any]) -> Dict[str, Any]:
        with self._lock:
            if self.active is None:
                return {"ok": False, "breakglass": self.status(),
                        "detail": "no break-glass is active"}
            why = request.get("why")
            self._revert("revoked", why if isinstance(why, str) and why else
                         "ended early over the control socket")
            return {"ok": True, "breakglass": self.status()}

    def status(self) -> Dict[str, Any]:
        active = self.active
        out: Dict[str, Any] = {"active": active is not None, "keys_dir": self.keys_dir,
                               "max_seconds": self.max_seconds}
        if active is not None:
            t = active.token
            out.update(token=t.nonce, issuer=t.issuer, reason=t.reason,
                       applied_at=iso(active.applied_at), not_after=iso(t.not_after),
                       remaining_s=round(max(0.0, active.deadline - self.monotonic()), 1),
                       base_mode=self.agent.base_snapshot.mode.value)
        return out

    # -- expiry ---------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        active = self.active
        if active is None:
            return
        # both clocks: a wall-clock step back must not stretch it past its monotonic
        # deadline, and a step forward past not_after ends it at once
        if now >= active.deadline or self.clock() >= active.token.not_after:
            with self._lock:
                if self.active is active:
                    self._revert("expired", f"not_after {iso(active.token.not_after)} reached")

    # -- admission: shared with ``execguard stop`` (agent/breakglass/stop.py) -------------
    def admit(self, data: bytes, grant: str = GRANT_MONITOR, event: str = "applied",
              **extra: Any) -> Token:
        """The token in ``data``, verified for ``grant`` and spent: its ``event`` line (with
        ``extra``) is in the ledger before this returns. Rejected otherwise, nothing spent."""
        with self._lock:
            return self._admit(data, grant, event, extra, None)[0]

    def admit_stop(self, data: bytes, event: str, policy_keys: str, policy_threshold: int,
                   **extra: Any) -> Tuple[Token, Authority]:
        """A stop token, spent: signed by the break-glass keys (their threshold) or, when
        they do not sign it, by ``policy_threshold`` of the policy root keys in
        ``policy_keys`` (M-of-N, as bundles are); and who authorized it, for the records."""
        with self._lock:
            return self._admit(data, GRANT_STOP, event, extra, (policy_keys, policy_threshold))

    def _admit(self, data: bytes, grant: str, event: str, extra: Dict[str, Any],
               policy: Optional[Tuple[str, int]]) -> Tuple[Token, Authority]:
        try:
            host = self.host()
        except ExecguardError as exc:
            raise Rejected("wrong-host", f"this host has no identity to check: {exc}") from None
        try:
            token, authority = self._signed(data, grant, host, policy)
        except Rejected as exc:
            if policy is None or exc.code not in ("no-keys", "untrusted-key"):
                raise
            token, authority = self._signed_by_policy(data, grant, host, policy, exc)
        extra = {**extra, "authority": authority.to_json()} if policy is not None else extra
        try:
            spent = self.ledger.spent()
        except ExecguardError as exc:
            raise Rejected("ledger-error", str(exc)) from None
        if token.nonce in spent:
            raise Rejected("replayed", f"token {token.token_id} was already applied on this "
                           "host; a token is single-use")
        try:  # spent before it takes effect: a crash after this cannot allow a replay
            self.ledger.append({"event": event, "at": iso(self.clock()),
                                "nonce": token.nonce, "token": token.to_json(), **extra})
        except (OSError, ExecguardError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise Rejected("ledger-error", f"{self.ledger.path}: cannot record the token "
                           f"({why}); refused") from None
        return token, authority

    def _signed(self, data: bytes, grant: str, host: HostId,
                policy: Optional[Tuple[str, int]]) -> Tuple[Token, Authority]:
        """Verified with the break-glass keys and threshold."""
        try:
            pinned = load_pinned_keys(self.keys_dir)
        except ExecguardError as exc:
            raise Rejected("no-keys", f"cannot load the pinned keys: {exc}") from None
        if not pinned:
            raise Rejected("no-keys", f"no break-glass key is pinned in {self.keys_dir}")
        token = verify(data, SOURCE, pinned, host, self.clock(), self.max_seconds,
                       self.threshold, grant)
        return token, Authority.of("breakglass", data, pinned, self.threshold)

    def _signed_by_policy(self, data: bytes, grant: str, host: HostId,
                          policy: Tuple[str, int], first: Rejected) -> Tuple[Token, Authority]:
        """Verified with the policy root keys and their threshold (M-of-N); ``first`` is the
        break-glass keys' refusal, kept in the message when these refuse too."""
        keys_dir, threshold = policy
        try:
            pinned = load_pinned(keys_dir)
        except ExecguardError as exc:
            raise Rejected(first.code, f"{first.detail}; the policy keys cannot sign a stop "
                           f"either: {exc}") from None
        try:
            token = verify(data, SOURCE, pinned, host, self.clock(), self.max_seconds,
                           threshold, grant, keys_name="policy")
        except Rejected as exc:
            if exc.code not in ("no-keys", "untrusted-key"):
                raise
            raise Rejected(exc.code, f"{first.detail}; nor by the policy keys ({keys_dir}, "
                           f"threshold {threshold}): {exc.detail}") from None
        return token, Authority.of("policy", data, pinned, threshold)

    def _install(self) -> None:
        agent = self.agent
        with agent.policy_lock:
            agent.install_policy(agent.base_snapshot)

    def _revert(self, why: str, detail: str) -> None:
        active = self.active
        if active is None:
            return
        self.active = None
        try:
            self._install()
        except Exception as exc:  # never leave the host in monitor mode silently
            self._warn(f"break-glass end could not reinstall the base policy: {exc!r}")
        self._ended(active.token.nonce, why, detail)
        self.agent.say(f"BREAK-GLASS ended ({why}): {detail}; mode "
                       f"{self.agent.decider.store.current.snapshot.mode.value}")

    def _ended(self, nonce: str, why: str, detail: str) -> None:
        try:
            self.ledger.append({"event": "ended", "at": iso(self.clock()), "nonce": nonce,
                                "why": why, "detail": detail})
        except (OSError, ExecguardError) as exc:
            self._warn(f"{self.ledger.path}: cannot record the end of {nonce[:12]}: {exc}")
        self.event(AgentEventKind.BREAKGLASS_END, nonce, (("reason", why), ("info", detail)))

    def rejected(self, exc: Rejected, text: str,
                 kind: AgentEventKind = AgentEventKind.BREAKGLASS_REJECT,
                 verb: Optional[str] = None) -> None:
        """A refused token: a ``rejected`` ledger line (with ``verb`` when it is not
        ``breakglass apply``), a ``kind`` agent event and a console line."""
        nonce = claimed_nonce(text.encode())
        record: Dict[str, Any] = {"event": "rejected", "at": iso(self.clock()), "nonce": nonce,
                                  "why": exc.code, "detail": exc.detail[:1000]}
        if verb is not None:
            record["verb"] = verb
        try:
            self.ledger.append(record)
        except (OSError, ExecguardError) as err:
            self._warn(f"{self.ledger.path}: cannot record a rejection: {err}")
        self.event(kind, nonce, (("reason", exc.code), ("info", exc.detail[:900])), ok=False)
        self.agent.say(f"{verb or 'break-glass'} token rejected: {exc}")

    def event(self, kind: AgentEventKind, nonce: Optional[str],
               fields: Tuple[Tuple[str, Any], ...], ok: bool = True) -> None:
        recorder = self.agent.recorder
        if recorder is not None:
            recorder.agent_event(AgentEvent(kind, (("token", nonce), *fields), ok))

    def _warn(self, text: str) -> None:
        self.agent.say(f"WARNING: {text}")
        self.agent.status_state.warnings.append(text)


def register(agent: Agent) -> BreakGlass:
    """Called from Agent.start(), after the recorder and decider exist and before the
    control socket opens."""
    opts = agent.opts
    controller = BreakGlass(agent, opts.breakglass_keys or DEFAULT_KEYS_DIR,
                            opts.breakglass_max_seconds or DEFAULT_MAX_SECONDS)
    controller.register()
    from agent.breakglass.stop import register as register_stop

    register_stop(agent, controller)  # the control verb "stop": the same keys and ledger
    return controller
