"""Run the real agent (``python -m agent run``) scoped to a tmpfs the test owns.

Every helper has a deadline and tears down in ``finally``: the agent is stopped (then
killed), the tmpfs unmounted. Execs are made with a timeout, so a stalled permission event
shows up as a test failure instead of a hung suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from agent.control import ControlError, request

REPO = Path(__file__).resolve().parents[1]
EXEC_TIMEOUT = 20.0
TREE = (sys.executable, "-m", "agent")  # the agent of this checkout


@contextlib.contextmanager
def scoped_tmpfs(size: str = "128m") -> Iterator[Path]:
    where = tempfile.mkdtemp(prefix="eg-agent-scope-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "eg-agent-test",
                    where], check=True, capture_output=True, timeout=10)
    try:
        yield Path(where)
    finally:
        subprocess.run(["umount", where], capture_output=True, timeout=10)
        if os.path.ismount(where):
            subprocess.run(["umount", "-l", where], capture_output=True, timeout=10)
        os.rmdir(where)


@dataclass
class RunningAgent:
    proc: subprocess.Popen  # type: ignore[type-arg]
    state_dir: Path
    log_dir: Path
    output: Path

    @property
    def socket(self) -> str:
        return str(self.state_dir / "control.sock")

    def status(self) -> Dict[str, Any]:
        return request(self.socket, timeout=5)

    def decisions(self) -> List[Dict[str, Any]]:
        path = self.log_dir / "decisions.jsonl"
        if not path.exists():
            return []
        # whole lines only: the writer may be in the middle of the last one
        lines = path.read_text().split("\n")[:-1]
        return [json.loads(line) for line in lines if line.strip()]

    def wait_decision(self, path: str, count: int = 1, timeout: float = 15.0
                      ) -> List[Dict[str, Any]]:
        deadline = time.monotonic() + timeout
        found: List[Dict[str, Any]] = []
        while time.monotonic() < deadline:
            found = [d for d in self.decisions() if d["event"]["path"] == path]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{count} decision(s) for {path} expected, saw {found}; "
                             f"agent output:\n{self.output.read_text()[-3000:]}")


@contextlib.contextmanager
def running_agent(tmp: Path, *args: str, ready_timeout: float = 90.0,
                  expect_state: Sequence[str] = ("ready",), execguard: Sequence[str] = TREE,
                  env: Optional[Dict[str, str]] = None) -> Iterator[RunningAgent]:
    """``execguard run`` (``execguard``: this checkout's by default, or an installed one run
    from ``tmp`` so that nothing of the checkout is importable)."""
    state, logs, out = tmp / "state", tmp / "log", tmp / "agent.out"
    cmd = [*execguard, "run", "--state-dir", str(state), "--log-dir",
           str(logs), "--status-interval", "0", *args]
    cwd = REPO if tuple(execguard) == TREE else tmp
    with open(out, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=str(cwd), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    agent = RunningAgent(proc, state, logs, out)
    try:
        deadline = time.monotonic() + ready_timeout
        status: Optional[Dict[str, Any]] = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"agent exited {proc.returncode}:\n{out.read_text()}")
            with contextlib.suppress(ControlError):
                status = agent.status()
                if status.get("state") != "starting":
                    break
            time.sleep(0.1)
        assert status is not None and status["state"] in expect_state, \
            f"agent not ready: {status}\n{out.read_text()}"
        yield agent
    finally:
        stop(proc)


def cli(*args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``execguard ARGS`` from the tree, as a subprocess: the CLI as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=str(REPO), input=stdin)


def keygen(prefix: Path) -> Path:
    """A key pair PREFIX.key / PREFIX.pub made by ``execguard keygen``; returns the .key."""
    done = cli("keygen", "--output-prefix", str(prefix), "--no-password")
    assert done.returncode == 0, done.stderr
    return Path(f"{prefix}.key")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def exec_file(path: Path, timeout: float = EXEC_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``path``; PermissionError (EPERM from the exec) comes back as returncode 126."""
    try:
        return subprocess.run([str(path)], capture_output=True, text=True, timeout=timeout)
    except PermissionError as exc:
        return subprocess.CompletedProcess([str(path)], 126, "", str(exc))


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the deadline")
        time.sleep(0.05)
