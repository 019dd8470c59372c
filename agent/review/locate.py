"""Where the configured agent keeps its decision log (and which policy it runs).

Order: an explicit ``--log-dir``; the running agent's answer over its control socket; the
installed policy ``/etc/execguard/policy.toml``; the embedded default policy. The caller
prints ``Located.how`` on stderr so the reviewer knows which log was read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

from agent.control import ControlError, request
from agent.policy import PolicySnapshot, default_policy, load_policy

INSTALLED_POLICY = "/etc/execguard/policy.toml"
ASK_TIMEOUT_S = 2.0  # a stalled agent must not stall the review tool


@dataclass(frozen=True)
class Located:
    log_dir: str
    how: str  # e.g. "from --log-dir", "from the agent on /run/execguard/control.sock"


def ask_agent(socket: str, timeout: float = ASK_TIMEOUT_S) -> Optional[Dict[str, Any]]:
    """The agent's status reply, or None when no agent answers (or it answers an error)."""
    try:
        reply = request(socket, "status", timeout=timeout)
    except ControlError:
        return None
    return None if "error" in reply else reply


def installed_policy(path: str = INSTALLED_POLICY) -> Optional[PolicySnapshot]:
    """The installed policy when the file exists; a broken one raises (InputError)."""
    if not os.path.exists(path):
        return None
    return load_policy(path)


def locate_log_dir(log_dir: Optional[str], socket: str,
                   policy_path: str = INSTALLED_POLICY, asked: bool = False,
                   reply: Optional[Dict[str, Any]] = None) -> Located:
    """Raises InputError/MalformedInput when the installed policy exists but is unreadable.
    ``asked``: the caller already asked the agent, and ``reply`` is its answer (or None)."""
    if log_dir:
        return Located(log_dir, "from --log-dir")
    if not asked:
        reply = ask_agent(socket)
    if reply is not None and isinstance(reply.get("log_dir"), str) and reply["log_dir"]:
        return Located(reply["log_dir"], f"from the running agent on {socket}")
    policy = installed_policy(policy_path)
    if policy is not None:
        return Located(policy.log_dir, f"from {policy_path} (no agent answered on {socket})")
    return Located(default_policy().log_dir,
                   f"from the embedded default policy (no agent answered on {socket}, "
                   f"no {policy_path})")


def agent_policy_path(reply: Optional[Dict[str, Any]]) -> Optional[str]:
    """The policy file a running agent reports, if its status names one."""
    if reply is None:
        return None
    for key in ("policy_file", "policy_source"):
        value = reply.get(key)
        if isinstance(value, str) and value.startswith("/"):
            return value
    policy = reply.get("policy")
    if isinstance(policy, dict):
        for key in ("file", "source", "path"):
            value = policy.get(key)
            if isinstance(value, str) and value.startswith("/"):
                return value
    return None
