"""Exec floods against the real agent: many execs at once, as root or as another user.

A flood is run by a small helper process (the system Python, so ``nobody`` can run it) that
forks one child per path; every child waits on one pipe and execs its path the moment the
pipe closes, so the execs really are concurrent. Each child's exit code comes back: 0 the
Go program ran, 126 the exec was refused (EPERM), 127 another exec error. Everything has a
deadline: a child still running at the end is killed and reported as -9.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from tests.policy_fixtures import GoBin, copy_signed

SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534

# argv: deadline_s path...; prints {"codes": [...]} in the order of the paths
FLOOD = r"""
import json, os, signal, sys, time
deadline, paths = time.monotonic() + float(sys.argv[1]), sys.argv[2:]
r, w = os.pipe()
kids = []
for path in paths:
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # every child waits here until the parent closes the pipe
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        try:
            os.execv(path, [path])
        except PermissionError:
            os._exit(126)
        except OSError:
            os._exit(127)
    kids.append(pid)
os.close(r)
os.close(w)  # go
codes = {}
while len(codes) < len(kids):
    if time.monotonic() > deadline:
        for pid in kids:
            if pid not in codes:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                codes[pid] = -9
        break
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid == 0:
        time.sleep(0.01)
        continue
    codes[pid] = os.waitstatus_to_exitcode(status)
print(json.dumps({"codes": [codes[pid] for pid in kids]}))
"""


def as_user(uid: Optional[int]) -> List[str]:
    """The command prefix that runs as ``uid`` (None: as we are)."""
    if uid is None:
        return []
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def start_flood(paths: Sequence[Path], uid: Optional[int] = None,
                deadline_s: float = 120.0) -> subprocess.Popen[str]:
    cmd = [*as_user(uid), SYSTEM_PYTHON, "-c", FLOOD, str(deadline_s), *map(str, paths)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def flood_codes(proc: subprocess.Popen[str], timeout: float = 150.0) -> List[int]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.communicate(timeout=10)
        raise AssertionError("a flood did not finish within its deadline") from None
    assert proc.returncode == 0, f"flood helper failed: {err}"
    return [int(c) for c in json.loads(out.splitlines()[-1])["codes"]]


def flood(paths: Sequence[Path], uid: Optional[int] = None) -> List[int]:
    return flood_codes(start_flood(paths, uid))


def big_unsigned(go: GoBin, directory: Path, name: str, size: int) -> Path:
    """An unsigned copy of a Go program, padded with a hole to ``size`` bytes: it still runs
    (the loader maps only its segments), is still Go, and verifying it hashes every byte;
    on tmpfs the hole costs no memory."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    shutil.copy2(go.path, path)
    os.truncate(path, size)
    return path


def signed_copies(go: GoBin, base: Path, key: Path, count: int) -> List[Path]:
    """``count`` signed copies of a Go program, each its own file (its own first exec)."""
    return [copy_signed(go, base / f"signed-{i}", key) for i in range(count)]


def enforce_policy(path: Path, scope: Path, key: Path, deadline_ms: int) -> Path:
    """Enforce in ``scope``: every file needs a signature by ``key`` (Go or not)."""
    path.write_text(
        f'version = 1\nmode = "enforce"\nscopes = ["{scope}"]\nfallthrough = "deny"\n'
        f'on_timeout = "deny"\n[limits]\ndecision_deadline_ms = {deadline_ms}\n'
        f'[trust]\nkeys = ["{key}"]\n'
        '[[rules]]\nid = "signed"\naction = "require-signature"\n')
    return path


class Repeater:
    """Execs ``paths`` one after another, over and over, on a thread, until stopped; keeps
    every exit code (the same codes as a flood's)."""

    def __init__(self, paths: Sequence[Path], uid: Optional[int] = None) -> None:
        self.paths, self.uid = list(paths), uid
        self.codes: Dict[str, List[int]] = {str(p): [] for p in self.paths}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for path, code in zip(self.paths, flood(self.paths, self.uid)):
                self.codes[str(path)].append(code)

    def __enter__(self) -> Repeater:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(180)


@contextlib.contextmanager
def cpu_limited(pid: int, percent: int) -> Iterator[None]:
    """Run ``pid`` (every thread) in a cgroup of its own capped at ``percent`` of one CPU: a
    slow host, as under qemu, for that process only. Skips the test without a cpu
    controller; always moves the process back and removes the cgroup."""
    import pytest

    name = f"execguard-test-slow-{os.getpid()}"
    v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/unified")
    if (v1 / "cpu.cfs_quota_us").exists():
        group, parent = v1 / name, v1
        settings = {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": str(1000 * percent)}
    elif "cpu" in _read(v2 / "cgroup.subtree_control").split():
        group, parent = v2 / name, v2
        settings = {"cpu.max": f"{1000 * percent} 100000"}
    else:
        pytest.skip("no cgroup cpu controller to slow the agent down with")
    group.mkdir()
    try:
        for key, value in settings.items():
            (group / key).write_text(value)
        (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        with contextlib.suppress(OSError):
            for task in _read(group / "cgroup.procs").split():
                (parent / "cgroup.procs").write_text(task)
        with contextlib.suppress(OSError):
            group.rmdir()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
