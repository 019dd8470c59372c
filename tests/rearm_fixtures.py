"""Policy files for the re-arm tests (a SIGHUP reload must re-arm the kernel's view):
the embedded default policy with its mode, scopes, keys and deadline replaced, so a reload
can change exactly one of them. Shared by the host tests (fanotify, kill) and the VM tests
(bpf-lsm, fmod-ret)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Dict, Sequence

from tests.agent_fixtures import REPO, RunningAgent, wait_for

DEFAULT = REPO / "agent" / "policy" / "default.toml"


def write_policy(path: Path, *, mode: str, scopes: Sequence[Path], keys: Sequence[Path],
                 deadline_ms: int = 500) -> Path:
    text = DEFAULT.read_text()
    for old, new in (('mode = "monitor"', f'mode = "{mode}"'),
                     ('scopes = ["/"]', f"scopes = {[str(s) for s in scopes]!r}".replace(
                         "'", '"')),
                     ('keys = ["/etc/execguard/keys/"]', f"keys = {[str(k) for k in keys]!r}"
                      .replace("'", '"')),
                     ("decision_deadline_ms = 500", f"decision_deadline_ms = {deadline_ms}")):
        assert old in text, f"{DEFAULT} no longer has {old!r}"
        text = text.replace(old, new)
    path.write_text(text)
    return path


def reload(agent: RunningAgent, sensor_key: str = "policy_swaps") -> Dict[str, Any]:
    """SIGHUP the agent and wait until its runner has re-armed (its swap counter moved)."""
    before = agent.status()
    swaps = int(before["sensor"].get(sensor_key, 0))
    os.kill(agent.proc.pid, signal.SIGHUP)
    wait_for(lambda: agent.status()["policy"]["digest"] != before["policy"]["digest"], 30)
    wait_for(lambda: int(agent.status()["sensor"].get(sensor_key, 0)) > swaps, 30)
    status: Dict[str, Any] = agent.status()
    return status
