"""Shared pieces of the exec benchmarks: a signed static Go target, scoped mounts, the exec
loop with its stall guard, CPU and RSS of a process group, and the agent under test.

Every exec made here is watched by ``StallGuard``: a permission handler that stalls costs a
benchmark a failed figure, never a frozen host.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from agent.control import ControlError, request  # noqa: E402

__all__ = ["REPO", "ControlError", "request"]  # re-exported for the bench scripts

GO_MAIN = "package main\n\nfunc main() {}\n"


# -- targets and mounts ---------------------------------------------------------------
def build_target(workdir: str) -> Tuple[str, str]:
    """(static Go binary signed beside itself as ``.sig``, public key PEM)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    src = os.path.join(workdir, "src")
    os.makedirs(src)
    with open(os.path.join(src, "go.mod"), "w") as fh:
        fh.write("module example.com/execbench\n\ngo 1.19\n")
    with open(os.path.join(src, "main.go"), "w") as fh:
        fh.write(GO_MAIN)
    out = os.path.join(workdir, "target")
    env = dict(os.environ, GOCACHE=os.path.join(workdir, "gocache"), GOFLAGS="-mod=mod",
               GOTOOLCHAIN="local", CGO_ENABLED="0")
    subprocess.run(["go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, "."], cwd=src,
                   env=env, check=True, timeout=300)
    priv = ec.generate_private_key(ec.SECP256R1())
    with open(out, "rb") as fh:
        sig = priv.sign(fh.read(), ec.ECDSA(hashes.SHA256()))
    with open(out + ".sig", "wb") as fh:
        fh.write(base64.b64encode(sig))
    pub = os.path.join(workdir, "bench.pub")
    with open(pub, "wb") as fh:
        fh.write(priv.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    return out, pub


@contextlib.contextmanager
def mounted(fstype: str, prefix: str) -> Iterator[str]:
    """A filesystem of the bench's own: tmpfs, ramfs, or ext4 on a loop-mounted image (a
    disk filesystem whose stamps follow every write: fanotify-exec needs no write guard
    there, docs/fanotify.md)."""
    where = tempfile.mkdtemp(prefix=prefix)
    image = where + ".img"
    if fstype == "ext4":
        subprocess.run(["truncate", "-s", "64M", image], check=True, timeout=10)
        subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True, capture_output=True,
                       timeout=60)
        argv = ["mount", "-o", "loop", image, where]
    else:
        opts = "size=64m,mode=0755" if fstype == "tmpfs" else "mode=0755"
        argv = ["mount", "-t", fstype, "-o", opts, f"eg-bench-{fstype}", where]
    subprocess.run(argv, check=True, capture_output=True, timeout=10)
    try:
        os.chmod(where, 0o755)
        yield where
    finally:
        subprocess.run(["umount", "-l", where], capture_output=True, timeout=10)
        os.rmdir(where)
        if os.path.exists(image):
            os.unlink(image)


def place(binary: str, directory: str) -> str:
    dst = os.path.join(directory, "target")
    for suffix in ("", ".sig"):
        with open(binary + suffix, "rb") as src, open(dst + suffix, "wb") as out:
            out.write(src.read())
    os.chmod(dst, 0o755)
    return dst


# -- the exec loop and its stall guard ------------------------------------------------
class StallGuard:
    """Kills the daemon under test (then the exec's child) when an exec or a probe open of a
    watched file waits longer than ``stall_s``: a stalled permission handler must cost this
    bench a failed figure, never a frozen host."""

    def __init__(self, stall_s: float, probe: Optional[str] = None,
                 probe_exec: bool = False) -> None:
        self.stall_s, self.probe, self.probe_exec = stall_s, probe, probe_exec
        self.victims: List[int] = []  # process group ids
        self.incidents: List[str] = []
        self._busy: Dict[str, Tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch, daemon=True)]
        if probe:
            self._threads.append(threading.Thread(target=self._probe, daemon=True))

    def __enter__(self) -> StallGuard:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def busy(self, what: str, child: int = 0) -> None:
        with self._lock:
            self._busy[what] = (time.monotonic(), child)

    def idle(self, what: str) -> None:
        with self._lock:
            self._busy.pop(what, None)

    def _probe(self) -> None:
        assert self.probe is not None
        while not self._stop.wait(0.2):
            self.busy("probe")
            with contextlib.suppress(OSError):
                if self.probe_exec:  # the exec path of a watched file, not only its open
                    os.waitpid(os.posix_spawn(self.probe, [self.probe], {}), 0)
                else:
                    os.close(os.open(self.probe, os.O_RDONLY))
            self.idle("probe")

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            with self._lock:
                stalled = [(w, t, c) for w, (t, c) in self._busy.items()
                           if time.monotonic() - t > self.stall_s]
            for what, since, child in stalled:
                self.incidents.append(f"{what} waited {time.monotonic() - since:.1f} s: "
                                      f"killed {self.victims or 'nothing'}")
                for pgid in self.victims:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pgid, signal.SIGKILL)
                if child and time.monotonic() - since > 2 * self.stall_s:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                self.busy(what, child)  # re-arm


def exec_block(path: str, n: int, guard: StallGuard) -> List[int]:
    """ns per fork+exec+wait of ``path`` (argv only, empty environment), ``n`` times."""
    out: List[int] = []
    argv = [path]
    for _ in range(n):
        t = time.perf_counter_ns()
        guard.busy("exec")
        pid = os.posix_spawn(path, argv, {})
        guard.busy("exec", pid)
        _, status = os.waitpid(pid, 0)
        guard.idle("exec")
        out.append(time.perf_counter_ns() - t)
        if status != 0:
            raise RuntimeError(f"{path}: exit status {status:#x} (denied or killed?)")
    return out


def group_cpu_s(pgid: int) -> float:
    """CPU seconds of every live thread in the process group (schedstat: ns resolution,
    where utime+stime in /proc/PID/stat counts 10 ms ticks)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                # after the comm: [0] state, [1] ppid, [2] pgrp
                if int(fh.read().rsplit(")", 1)[1].split()[2]) != pgid:
                    continue
            for tid in os.listdir(f"/proc/{entry}/task"):
                with open(f"/proc/{entry}/task/{tid}/schedstat") as fh:
                    total += int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def rss_mb(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


# -- the daemons under test -----------------------------------------------------------
class Daemon:
    """A started condition: the process group to account and to kill."""

    def __init__(self, proc: Optional[subprocess.Popen[bytes]], label: str) -> None:
        self.proc, self.label, self.info = proc, label, {}  # type: Dict[str, Any]

    @property
    def pgid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def agent_running(work: str, backend: str, mode: str, scope: str, key: str,
                  extra: Sequence[str] = (), ready_s: float = 120.0,
                  repo: str = REPO) -> Iterator[Daemon]:
    """The agent of the checkout at ``repo`` (another one: a before/after comparison)."""
    state = tempfile.mkdtemp(prefix="state-", dir=work)
    logs = tempfile.mkdtemp(prefix="log-", dir=work)
    cmd = [sys.executable, "-m", "agent", "run", "--state-dir", state, "--log-dir", logs,
           "--status-interval", "0", "--quiet", "--audit", "off", "--mode", mode,
           "--scope", scope, "--key", key, "--backend", backend, *extra]
    out = os.path.join(logs, "agent.out")
    with open(out, "wb") as fh:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=repo, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    daemon = Daemon(proc, f"{backend}/{mode}")
    daemon.info = {"socket": os.path.join(state, "control.sock"),
                   "log": os.path.join(logs, "decisions.jsonl"), "out": out}
    try:
        deadline = time.monotonic() + ready_s  # a BCC compile under emulation: minutes
        status: Dict[str, Any] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(ControlError):
                status = request(daemon.info["socket"], timeout=5)
                if status.get("state") != "starting":
                    break
            time.sleep(0.1)
        if status.get("backend") != backend or status.get("state") not in ("ready", "degraded"):
            tail = Path(out).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"agent {backend}/{mode} not up: {status}\n{tail}")
        # the kill backend kills a file not verified before its first exec: wait for the
        # start-up scan, which verifies the targets already in the scope
        while time.monotonic() < deadline and not (status.get("prewarm") or {}).get(
                "scan_done"):
            time.sleep(0.1)
            status = request(daemon.info["socket"], timeout=5)
        yield daemon
    except (ControlError, OSError) as exc:
        tail = Path(out).read_text(errors="replace")[-1500:]
        raise RuntimeError(f"agent {backend}/{mode}: {exc} (exit {proc.poll()})\n{tail}"
                           ) from exc
    finally:
        daemon.stop()


def wait_decisions(log: str, path: str, count: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            with open(log) as fh:
                seen = sum(1 for line in fh if f'"path": "{path}"' in line
                           or f'"path":"{path}"' in line)
            if seen >= count:
                return seen
        time.sleep(0.05)
    return seen
