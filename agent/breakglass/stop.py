"""The control verb ``stop`` behind ``execguard stop``: a break-glass token whose grant is
``stop`` ends the agent and releases enforcement. It may be signed by the break-glass keys
or, M-of-N as bundles are, by the policy root keys (``--policy-keys``, ``--policy-threshold``).

On a bpf-lsm host with keep-enforcing the kernel refuses signals to the agent (issue 10),
so this is the one way to end enforcement short of a reboot; on every backend it is the
authenticated one. The token is checked exactly as ``breakglass-apply`` checks its own
(``BreakGlass.admit``: the same pinned keys, threshold, host, clock and single-use ledger),
but only a ``stop`` grant passes: a monitor token is refused here and a stop token by apply
(``wrong-grant``). Accepted: the nonce is spent (ledger ``stop``), an ``authorized-stop``
audit record names the token, issuer and reason, the answer goes out, and only then does
the agent stop, asking its runner to release what would outlive it (pinned programs,
self-protection). Refused: a ``stop-reject`` record, and the agent runs on.
Details: docs/breakglass.md.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Optional

from agent.breakglass.token import MAX_REASON, Rejected, Token, reason_ok
from agent.control import after_reply
from agent.record.audit_format import AgentEventKind

if TYPE_CHECKING:
    from agent.breakglass.overlay import BreakGlass
    from agent.daemon import Agent

VERB = "stop"
LEDGER_EVENT = "stop"  # spends the nonce, like "applied" (token.SPENDING_EVENTS)


def stop_reason(token: Token, why: Optional[str]) -> str:
    """The operator's ``--why`` when given (with the token's own reason when it differs),
    else the token's reason."""
    if not why or why == token.reason:
        return token.reason
    return f"{why} (token reason: {token.reason})"


class AuthorizedStop:
    """The ``stop`` verb of one agent; admission and records go through its BreakGlass."""

    def __init__(self, agent: Agent, breakglass: BreakGlass) -> None:
        self.agent = agent
        self.breakglass = breakglass

    def handle(self, request: Dict[str, Any]) -> Dict[str, Any]:
        why = request.get("why")
        if why is not None and not (isinstance(why, str) and reason_ok(why)):
            return {"error": f"stop: 'why' must be 1 to {MAX_REASON} printable characters"}
        if self.agent.stopping:  # nothing to authorize; the token stays unspent
            return {"error": "the agent is already stopping"}
        text = request.get("token")
        bg = self.breakglass
        try:
            if not isinstance(text, str) or not text.strip():
                raise Rejected("malformed", "the stop request carries no token (the text of "
                               "a break-glass token with grant 'stop')")
            opts = self.agent.opts
            token, authority = bg.admit_stop(text.encode(errors="replace"), LEDGER_EVENT,
                                             opts.policy_keys, opts.policy_threshold,
                                             **({"detail": why} if why else {}))
        except Rejected as exc:
            bg.rejected(exc, text if isinstance(text, str) else "",
                        AgentEventKind.STOP_REJECT, verb=VERB)
            return {"error": str(exc), "rejected": exc.code}
        reason = stop_reason(token, why)
        runner = self.agent.runner
        release = callable(getattr(runner, "release", None))
        bg.event(AgentEventKind.AUTHORIZED_STOP, token.nonce,
                 (("issuer", token.issuer), *authority.fields(),
                  ("release", "yes" if release else "no"), ("info", reason)))
        self.agent.say(f"AUTHORIZED STOP by token {token.token_id} (issuer {token.issuer}; "
                       f"{authority.threshold} of the {authority.keys} keys): {reason}; the "
                       "agent stops"
                       + (" and releases enforcement" if release else ""))
        record_why = f"authorized stop by token {token.token_id}: {reason}"
        # the answer first: request_stop lets the main loop end the process
        after_reply(lambda: self.agent.request_stop(record_why, release=True))
        return {"ok": True, "stopping": True, "token": token.nonce, "issuer": token.issuer,
                "authority": authority.to_json(), "reason": reason, "release": release,
                "pid": os.getpid(), "backend": getattr(runner, "name", None)}


def register(agent: Agent, breakglass: BreakGlass) -> AuthorizedStop:
    """The control verb ``stop``; called by ``agent.breakglass.overlay.register``."""
    verb = AuthorizedStop(agent, breakglass)
    agent.commands[VERB] = verb.handle
    return verb
