"""The watchdog of the fanotify responder: a separate process, because a stalled responder
(SIGSTOP, a deadlock, a debugger) cannot notice its own stall, and the kernel never times
out a permission event.

The responder's event loop writes one byte to a pipe per iteration (at least every
deadline/4, even when idle) and, inside a long batch of events, after each event (at most
every 10 ms): it beats while it makes progress, however slowly its decide workers go (the
loop never waits for them: late decisions get the on_timeout answer). If nothing arrives for
``stall_s`` while the responder is stopped, or for 4 x ``stall_s`` + 1 s while it runs, the
loop is stuck (a deadlock, a frozen thread, a call that never returns) and the watchdog
SIGKILLs it: the kernel then releases its fanotify group and allows every pending event
(fail-open), and systemd (Restart=) brings the agent back. A loop that is merely slow, or
that cannot read events for want of fds (the kernel denies those), keeps beating and is
never killed. EOF on the pipe, or the responder's exit, ends the watchdog quietly.

It runs in its own session, so a terminal's Ctrl-Z (SIGTSTP to the foreground process
group) stops the agent but not its watchdog. Run it as
``python -m agent.sensors.fanotify_watchdog --pid PID --fd FD --stall SECONDS``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

EXIT_CLEAN = 0  # the responder exited or closed its end
EXIT_KILLED = 3  # the responder stalled and was killed
HARD_FACTOR, HARD_SLACK_S = 4, 1.0  # running but silent: 4 x stall + 1 s


def watch(target_pid: int, hb_fd: int, stall_s: float) -> int:
    """Watch ``hb_fd`` (read end) and kill ``target_pid`` when it is silent for stall_s."""
    pidfd = -1
    try:
        pidfd = os.pidfd_open(target_pid)  # no pid-reuse race on kill, and readable on exit
    except ProcessLookupError:
        return EXIT_CLEAN
    except (AttributeError, OSError):
        pidfd = -1  # Python < 3.9 or Linux < 5.3: plain kill(2)
    poller = select.poll()
    poller.register(hb_fd, select.POLLIN)
    if pidfd >= 0:
        poller.register(pidfd, select.POLLIN)
    last = time.monotonic()
    while True:
        left = last + stall_s - time.monotonic()
        ready = poller.poll(max(0, int(left * 1000) + 1)) if left > 0 else []
        silent = time.monotonic() - last
        if not ready and silent >= stall_s:
            # A stopped responder (SIGSTOP, a debugger) is killed at the deadline. One that
            # is running but late (an exec storm on 2 cores) gets more slack, so load alone
            # never fails enforcement open; a real deadlock still ends at the hard limit.
            if _stopped(target_pid) or silent >= stall_s * HARD_FACTOR + HARD_SLACK_S:
                _kill(target_pid, pidfd)
                sys.stderr.write(
                    f"execguard watchdog: fanotify responder {target_pid} silent for "
                    f"{silent:.2f}s: killed (kernel allows its pending execs)\n"
                )
                return EXIT_KILLED
            ready = poller.poll(50)
        for fd, _ in ready:
            if fd == pidfd:
                return EXIT_CLEAN
            try:
                beats = os.read(hb_fd, 4096)
            except OSError:
                time.sleep(0.05)  # ENOMEM and the like: not a beat, and no reason to exit
                continue
            if not beats:
                return EXIT_CLEAN  # EOF: every write end is closed
            last = time.monotonic()


def _stopped(pid: int) -> bool:
    """State T (stopped) or t (traced) in /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    return state in (b"T", b"t")


def _kill(pid: int, pidfd: int) -> None:
    try:
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Watchdog:
    """The responder's side: spawn the watchdog process and hand its pipe to the backend.

    Spawn it before the backend marks anything, pass ``heartbeat_fd`` to FanotifyBackend,
    and add ``pid`` to its exempt set (it is a descendant anyway)."""

    def __init__(self, proc: subprocess.Popen[bytes], heartbeat_fd: int) -> None:
        self.proc = proc
        self.heartbeat_fd = heartbeat_fd

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def spawn(cls, stall_s: float, target_pid: Optional[int] = None) -> Watchdog:
        target = os.getpid() if target_pid is None else target_pid
        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        cmd: List[str] = [sys.executable, "-m", "agent.sensors.fanotify_watchdog"]
        cmd += ["--pid", str(target), "--fd", str(r), "--stall", repr(float(stall_s))]
        try:
            proc = subprocess.Popen(
                cmd, pass_fds=(r,), stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        return cls(proc, w)

    def close(self, wait_s: float = 5.0) -> Optional[int]:
        """Close our end (the watchdog exits on EOF) and reap it; returns its exit code."""
        if self.heartbeat_fd >= 0:
            os.close(self.heartbeat_fd)
            self.heartbeat_fd = -1
        try:
            return self.proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="execguard-fanotify-watchdog")
    ap.add_argument("--pid", type=int, required=True, help="responder pid to kill on a stall")
    ap.add_argument("--fd", type=int, required=True, help="read end of the heartbeat pipe")
    ap.add_argument("--stall", type=float, required=True, help="seconds of silence allowed")
    a = ap.parse_args(argv)
    if a.stall <= 0:
        ap.error(f"--stall must be positive, got {a.stall}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # outlive a Ctrl-C meant for the agent
    return watch(a.pid, a.fd, a.stall)


if __name__ == "__main__":
    sys.exit(main())
