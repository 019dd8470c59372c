"""The fanotify backend never hangs the host: a killed responder fails open, a stopped one
is killed by its watchdog within the deadline, and a clean stop leaves nothing behind.

Each test owns its tmpfs, runs a liveness probe, and tears down in finally.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from agent.sensors import fanotify_watchdog as wdmod
from tests.fanotify_fixtures import install, own_tmpfs, responder, run

WATCHDOG = [sys.executable, "-m", "agent.sensors.fanotify_watchdog"]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="fanotify permission events need root"),
    pytest.mark.timeout(90),
]


def test_sigkill_fails_open_even_for_a_pending_exec() -> None:
    with own_tmpfs() as mnt:
        bad, slow = install(mnt, "bad"), install(mnt, "slow")
        plan = {"bad": "deny", "slow": "sleep:60:deny"}
        with responder(mnt, plan=plan, deadline_s=30.0) as r:
            with pytest.raises(PermissionError):
                run(bad)
            waiting = subprocess.Popen(["/bin/sh", "-c", 'exec "$0"', slow])
            try:
                time.sleep(0.5)  # it now waits for a decision that would take 60 s
                assert waiting.poll() is None
                t0 = time.monotonic()
                os.kill(r.pid, signal.SIGKILL)
                assert waiting.wait(10) == 0  # the kernel allowed it when the group went
                assert time.monotonic() - t0 < 10
            finally:
                waiting.kill()
                waiting.wait()
            r.proc.join(10)
            assert run(bad) == 0  # no agent, no enforcement: fail-open


def test_sigstop_watchdog_kills_the_responder_within_the_deadline() -> None:
    deadline = 1.0
    with own_tmpfs() as mnt:
        bad = install(mnt, "bad")
        cfg = {"plan": {"bad": "deny"}, "deadline_s": deadline, "watchdog_stall_s": deadline}
        with responder(mnt, probe_limit_s=deadline + 6.0, **cfg) as r:
            assert r.watchdog_pid is not None
            with pytest.raises(PermissionError):
                run(bad)
            os.kill(r.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            assert run(bad) == 0  # waited for the watchdog, then the kernel allowed it
            waited = time.monotonic() - t0
            assert waited < deadline + 2.0, f"exec waited {waited:.2f}s"
            r.proc.join(10)
            assert r.proc.exitcode == -signal.SIGKILL


def test_a_stopped_responder_with_a_second_group_is_killed_and_the_exec_goes() -> None:
    """The agent holds a second fanotify group (the pre-warm's close-after-write watch on
    the scope's mount). While an exec waits, the kernel pins the current mark of every
    connector it walked; had that been the second group's mount mark, its release at the
    watchdog's SIGKILL (last-opened-first) would wait for the exec, the exec for the
    permission group, released after it: the exec would wait for ever (seen: 8 minutes,
    until killed). The permission group marks each mount too, so only its marks are
    pinned (agent/sensors/fanotify_marks.py)."""
    deadline = 1.0
    with own_tmpfs() as mnt:
        bad = install(mnt, "bad")
        cfg = {"plan": {"bad": "deny"}, "deadline_s": deadline, "watchdog_stall_s": deadline,
               "close_write_group": True}
        with responder(mnt, probe_limit_s=deadline + 6.0, **cfg) as r:
            assert r.ready_stats["marked_mounts"] == 1
            os.kill(r.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            waiting = subprocess.Popen(["/bin/sh", "-c", 'exec "$0"', bad])
            try:
                assert waiting.wait(15) == 0  # the watchdog killed it, the kernel allowed
            finally:
                waiting.kill()  # a stuck exec waits killably: this frees the group
                waiting.wait()
            assert time.monotonic() - t0 < deadline + 4.0
            r.proc.join(10)
            assert r.proc.exitcode == -signal.SIGKILL


def test_watchdog_exits_quietly_on_a_clean_stop() -> None:
    with own_tmpfs() as mnt:
        ok = install(mnt, "ok")
        with responder(mnt, deadline_s=0.5, watchdog_stall_s=0.5) as r:
            assert run(ok) == 0
            time.sleep(1.5)  # idle for three deadlines: the loop still beats
            assert r.proc.is_alive()
            stats, code = r.stop()
            assert code == wdmod.EXIT_CLEAN
            assert stats["state"] == "stopped" and stats["heartbeat_errors"] == 0
        assert run(ok) == 0


def test_watchdog_process_kills_a_silent_target() -> None:
    """The watchdog alone, on a plain process: silence past --stall means SIGKILL."""
    target = subprocess.Popen(["sleep", "30"])
    r, w = os.pipe()
    try:
        t0 = time.monotonic()
        wd = subprocess.Popen(
            [*WATCHDOG, "--pid", str(target.pid), "--fd", str(r), "--stall", "0.5"],
            pass_fds=(r,),
            stderr=subprocess.PIPE,
        )
        os.close(r)
        assert wd.wait(20) == wdmod.EXIT_KILLED
        assert target.wait(10) == -signal.SIGKILL
        assert time.monotonic() - t0 < 15
        assert wd.stderr is not None and b"silent" in wd.stderr.read()
    finally:
        os.close(w)
        target.kill()
        target.wait()


def test_watchdog_rejects_a_bad_stall() -> None:
    proc = subprocess.run(
        [*WATCHDOG, "--pid", "1", "--fd", "0", "--stall", "0"],
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert proc.returncode == 2 and b"--stall must be positive" in proc.stderr


def test_stop_answers_what_is_pending_with_the_on_timeout_answer() -> None:
    with own_tmpfs() as mnt:
        slow = install(mnt, "slow")
        plan = {"slow": "sleep:5:allow"}
        with responder(mnt, plan=plan, deadline_s=20.0, on_timeout_allow=False) as r:
            waiting = subprocess.Popen(["/bin/sh", "-c", 'exec "$0"', slow])
            try:
                time.sleep(0.5)
                assert waiting.poll() is None
                stats, _ = r.stop()
                assert waiting.wait(10) == 126  # denied: the on_timeout answer, not a hang
            finally:
                waiting.kill()
                waiting.wait()
            assert stats["stopping"] == 1 and stats["state"] == "stopped"
