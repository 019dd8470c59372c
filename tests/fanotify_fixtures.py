"""Fixtures for the fanotify backend tests: a private tmpfs, a responder process, and the
liveness probe that docs/architecture.md asks of every permission-event test.

The backend runs in a forked child (the responder), so the test process can SIGSTOP and
SIGKILL it, and so the test's own execs are not the responder's descendants (which the
backend exempts). The responder's decide() follows a plan: file name -> action.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from agent.decision import ExecEvent
from agent.sensors import fanotify_sys as fs
from agent.sensors.fanotify_backend import FanotifyBackend, Outcome
from agent.sensors.fanotify_watchdog import Watchdog

CTX = mp.get_context("fork")
PROBE = "probe-true"  # the liveness probe's binary: always allowed


@contextlib.contextmanager
def own_ext4() -> Iterator[str]:
    """An ext4 of this test's own on a loop-mounted image (a filesystem whose stamps follow
    every write: no write guard, no ignore mark there)."""
    mnt = tempfile.mkdtemp(prefix="execguard-fan-ext4-")
    image = mnt + ".img"
    try:
        subprocess.run(["truncate", "-s", "32M", image], check=True, timeout=10)
        subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True, timeout=60,
                       capture_output=True)
        subprocess.run(["mount", "-o", "loop", image, mnt], check=True, timeout=10)
        os.chmod(mnt, 0o755)
        yield mnt
    finally:
        if os.path.ismount(mnt) and subprocess.run(["umount", mnt], timeout=10,
                                                   check=False).returncode != 0:
            subprocess.run(["umount", "-l", mnt], timeout=10, check=False)
        os.rmdir(mnt)
        if os.path.exists(image):
            os.unlink(image)


@contextlib.contextmanager
def own_tmpfs() -> Iterator[str]:
    """A tmpfs only this test uses: the backend's mount mark affects nothing else."""
    mnt = tempfile.mkdtemp(prefix="execguard-fan-")
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m,mode=0755", "execguard-fan", mnt],
        check=True,
        timeout=10,
    )
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", mnt], timeout=10, check=False).returncode != 0:
            subprocess.run(["umount", "-l", mnt], timeout=10, check=False)
        os.rmdir(mnt)


def install(mnt: str, name: str, src: str = "/bin/true") -> str:
    dst = os.path.join(mnt, name)
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o755)
    return dst


def run(path: str, timeout: float = 20.0) -> int:
    """Exec ``path``; EPERM from the backend raises PermissionError."""
    return subprocess.run([path], timeout=timeout, check=False).returncode


# -- the responder (child side) -------------------------------------------------------
def _decide_by_plan(
    plan: Dict[str, str], calls: Dict[str, int], seen: Dict[str, ExecEvent]
) -> Callable[..., bool]:
    def decide(event: ExecEvent, fd: int) -> bool:
        name = os.path.basename(event.path)
        calls[name] = calls.get(name, 0) + 1
        seen[name] = event
        action = plan.get(name, "allow")
        if action.startswith("sleep:"):  # sleep:<seconds>:<allow|deny>
            _, secs, then = action.split(":")
            time.sleep(float(secs))
            return then == "allow"
        if action == "raise":
            raise RuntimeError("decide failed on purpose")
        if action == "write-open-once":  # another process opens it for write meanwhile
            plan[name] = "allow"
            subprocess.run(["/bin/sh", "-c", 'exec 3>>"$0"', event.path], check=True,
                           timeout=10)
            return True
        if action == "reopen":  # what a verifier reading <file>.sig does: an open in scope
            with open(event.path, "rb") as f:
                f.read(4)
            return True
        if action == "elf":  # read through the event fd, never the path
            return os.pread(fd, 4, 0) == b"\x7fELF"
        if action.startswith("sha:"):  # sha:<hex>: allow exactly these bytes (read via fd)
            digest = hashlib.sha256()
            offset = 0
            while chunk := os.pread(fd, 1 << 20, offset):
                digest.update(chunk)
                offset += len(chunk)
            return digest.hexdigest() == action[4:]
        return action == "allow"

    return decide


def _child(cfg: Dict[str, Any], cmds: Any, out: Any) -> None:
    calls: Dict[str, int] = {}
    seen: Dict[str, ExecEvent] = {}
    wd: Optional[Watchdog] = None
    if cfg.get("watchdog_stall_s"):
        wd = Watchdog.spawn(cfg["watchdog_stall_s"])

    lookup_plan: Dict[str, bool] = cfg.get("lookup_plan", {})
    broken: Dict[str, int] = dict(cfg.get("break_events", {}))  # name -> events to break
    if broken:
        from agent.sensors import fanotify_scope

        real = fanotify_scope.exec_event

        def exec_event(pid: int, path: str, st: os.stat_result, backend: str) -> ExecEvent:
            name = os.path.basename(path)
            if broken.get(name, 0) > 0:  # a bug in the loop, on purpose
                broken[name] -= 1
                raise RuntimeError(f"exec_event broken on purpose for {name}")
            return real(pid, path, st, backend)

        fanotify_scope.exec_event = exec_event  # type: ignore[assignment]

    def lookup(event: ExecEvent) -> Optional[bool]:
        return lookup_plan.get(os.path.basename(event.path))

    def observe(o: Outcome) -> None:
        out.put(("outcome", o.cause.value, o.allowed, os.path.basename(o.path), o.pid))

    backend = FanotifyBackend(
        [cfg.get("scope_dir", cfg["scope"])],
        _decide_by_plan(cfg.get("plan", {}), calls, seen),
        cfg.get("deadline_s", 2.0),
        cfg.get("on_timeout_allow", True),
        cfg.get("exempt_pids", ()),
        observer=observe,
        lookup=lookup if lookup_plan else None,
        workers=cfg.get("workers", 4),
        ignore_marks=cfg.get("ignore_marks", True),
        exempt_descendants=cfg.get("exempt_descendants", True),
        heartbeat_fd=wd.heartbeat_fd if wd else None,
        mask=cfg.get("mask"),
        **{k: cfg[k] for k in ("share_answers", "max_pending", "max_per_uid", "mounts_every_s")
           if k in cfg},
    )
    backend.start()
    if cfg.get("close_write_group"):
        # a second group of this process, as the agent's pre-warm has: close-after-write
        # notifications on the scope's mount (never read: they only queue)
        notify = fs.fanotify_init(fs.FAN_CLOEXEC | fs.FAN_NONBLOCK, fs.EVENT_F_FLAGS)
        fs.fanotify_mark(notify, fs.FAN_MARK_ADD | fs.FAN_MARK_MOUNT, 0x8, fs.AT_FDCWD,
                         cfg["scope"])
    out.put(("ready", backend.stats(), wd.pid if wd else None))
    while True:
        cmd = cmds.get()
        if cmd[0] == "stats":
            out.put(("stats", backend.stats(), dict(calls), dict(seen)))
        elif cmd[0] == "exec":  # an exec by the responder's own child: exempt
            rc = subprocess.run([cmd[1]], timeout=20, check=False).returncode
            out.put(("exec", rc))
        elif cmd[0] == "stop":
            backend.stop()
            code = wd.close() if wd else None
            out.put(("stopped", backend.stats(), code))
            return


# -- the responder (test side) --------------------------------------------------------
class Responder:
    def __init__(self, scope: str, **cfg: Any) -> None:
        self.cfg = dict(cfg, scope=scope)
        self.cmds = CTX.Queue()
        self.out = CTX.Queue()
        self.proc = CTX.Process(target=_child, args=(self.cfg, self.cmds, self.out))
        self.outcomes: List[Tuple[str, bool, str, int]] = []
        self.ready_stats: Dict[str, Any] = {}
        self.watchdog_pid: Optional[int] = None
        self.seen: Dict[str, ExecEvent] = {}  # the last ExecEvent decide() got, by name

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def start(self) -> Responder:
        self.proc.start()
        _, self.ready_stats, self.watchdog_pid = self._expect("ready", 15)
        return self

    def _expect(self, kind: str, timeout: float) -> Tuple[Any, ...]:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0 or (not self.proc.is_alive() and self.out.empty()):
                raise AssertionError(f"responder: no {kind!r} message within {timeout}s")
            try:
                msg = self.out.get(timeout=min(left, 0.5))
            except Exception:
                continue
            if msg[0] == "outcome":
                self.outcomes.append(tuple(msg[1:]))
            elif msg[0] == kind:
                return tuple(msg)

    def stats(self) -> Tuple[Dict[str, Any], Dict[str, int]]:
        """The backend's counters, and how often decide() was asked about each name."""
        self.cmds.put(("stats",))
        _, stats, calls, self.seen = self._expect("stats", 10)
        return stats, calls

    def exec_as_child(self, path: str) -> int:
        self.cmds.put(("exec", path))
        return int(self._expect("exec", 25)[1])

    def settle(self, wait_s: float = 0.3) -> List[Tuple[str, bool, str, int]]:
        """Collect the observer's outcomes that arrived so far."""
        with contextlib.suppress(AssertionError):
            self._expect("never", wait_s)
        return self.outcomes

    def stop(self) -> Tuple[Dict[str, Any], Optional[int]]:
        self.cmds.put(("stop",))
        _, stats, code = self._expect("stopped", 15)
        self.proc.join(10)
        return stats, code

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGKILL)
        self.proc.join(10)
        if self.watchdog_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.watchdog_pid, signal.SIGKILL)


class LivenessProbe:
    """Every 0.2 s: change the probe binary (a write: no ignore mark or memory holds) and
    exec it. If one round waits past ``limit_s``, SIGKILL the responder: the kernel then
    allows everything pending, so a broken backend fails the test instead of hanging the
    host."""

    def __init__(self, probe_path: str, responder_pid: int, limit_s: float) -> None:
        self.path, self.pid, self.limit = probe_path, responder_pid, limit_s
        self.fired = False
        self.rounds = 0
        self._since: Optional[float] = None
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._probe, daemon=True),
            threading.Thread(target=self._watch, daemon=True),
        ]

    def __enter__(self) -> LivenessProbe:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.limit + 25)

    def _probe(self) -> None:
        while not self._stop.wait(0.2):
            self._since = time.monotonic()
            with open(self.path, "ab") as f:
                f.write(b"\0")
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([self.path], timeout=20, check=False)
            self._since = None
            self.rounds += 1

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            since = self._since
            if since is not None and time.monotonic() - since > self.limit and not self.fired:
                self.fired = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)


@contextlib.contextmanager
def responder(mnt: str, probe_limit_s: float = 5.0, **cfg: Any) -> Iterator[Responder]:
    """A started responder scoped to ``mnt`` with a liveness probe; torn down in finally."""
    probe = install(mnt, PROBE)
    r = Responder(mnt, **cfg)
    try:
        r.start()
        with LivenessProbe(probe, r.pid, probe_limit_s) as live:
            yield r
        assert not live.fired, "liveness probe: an exec in scope waited too long"
    finally:
        r.kill()
