"""One enforcing agent with every way's files in its scope: the module fixture of the host
tests, usable by the VM tests as well (nothing in it is host-only).

The scope is a tmpfs the test mounts; the work directory (mounts outside the scope, foreign
files) is a fresh directory of the test's own. The agent starts after every way has
prepared its files, so its pre-scan judges them before the first attack. On exit: the agent
stops, every mount made below the scope or the work directory is undone, then both go.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Sequence

from tests.agent_fixtures import RunningAgent, running_agent, scoped_tmpfs, wait_for
from tests.attacks.harness import unmount_below
from tests.attacks.policies import ALL_SIGNED, write_policy
from tests.attacks.ways import WAYS, Stage, Way, make_stage, prepare_stage
from tests.rearm_fixtures import reload


@contextlib.contextmanager
def work_dir() -> Iterator[Path]:
    """A directory outside the scope (and on another filesystem than its tmpfs), searchable
    by nobody. Never removed while anything is still mounted below it: a leftover bind mount
    of the scope would have rmtree delete through it."""
    path = Path(tempfile.mkdtemp(prefix="eg-attack-work-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        left = unmount_below(path)
        if left:
            raise RuntimeError(f"mounts left below {path}, not removed: {left}")
        shutil.rmtree(path)


@dataclass
class Arena:
    backend: str
    stage: Stage
    agent: RunningAgent
    policy_file: Path
    public_key: Path
    deadline_ms: int
    current: str = ALL_SIGNED
    swaps: List[str] = field(default_factory=list)

    def use_policy(self, kind: str) -> None:
        """Switch the agent to another policy of policies.py (a SIGHUP reload that waits
        until the backend re-armed), unless it is the one in force."""
        if kind == self.current:
            return
        write_policy(self.policy_file, kind, self.stage.scope, self.public_key, self.deadline_ms)
        reload(self.agent)
        self.current = kind
        self.swaps.append(kind)

    def settle(self, quiet: float = 0.3, timeout: float = 5.0) -> None:
        """Until the decision log stops growing: records are written after the answer."""
        deadline = time.monotonic() + timeout
        size = -1
        while time.monotonic() < deadline:
            now = self.decision_count()
            if now == size:
                return
            size = now
            time.sleep(quiet)

    def decision_count(self) -> int:
        return len(self.agent.decisions())

    def decisions_since(self, count: int) -> List[Dict[str, Any]]:
        return self.agent.decisions()[count:]


@contextlib.contextmanager
def arena(backend: str, tmp: Path, tools: Mapping[str, Path], private_key: Path,
          public_key: Path, ways: Sequence[Way] = WAYS, deadline_ms: int = 5000,
          ready_timeout: float = 90.0, prewarm_timeout: float = 60.0, judge_pause: float = 1.0,
          agent_args: Sequence[str] = ("--audit", "off")) -> Iterator[Arena]:
    """An agent of ``backend`` in enforce mode under the ALL_SIGNED policy, every way of
    ``ways`` prepared in its scope and pre-scanned. Under qemu TCG raise the deadline, the
    timeouts and ``judge_pause`` (see ways.Stage)."""
    with scoped_tmpfs("256m") as scope, work_dir() as work:
        stage = make_stage(scope, work, tools, private_key, judge_pause)
        try:
            prepare_stage(stage, ways)
            policy = write_policy(tmp / "policy.toml", ALL_SIGNED, scope, public_key,
                                  deadline_ms)
            with running_agent(tmp, "--policy", str(policy), "--backend", backend,
                               *agent_args, ready_timeout=ready_timeout) as agent:
                wait_for(lambda: bool(agent.status()["prewarm"]["scan_done"]),
                         timeout=prewarm_timeout)
                yield Arena(backend, stage, agent, policy, public_key, deadline_ms)
        finally:
            unmount_below(scope)  # what stays busy, scoped_tmpfs detaches lazily
