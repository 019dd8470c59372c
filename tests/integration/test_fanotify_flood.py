"""The fanotify backend under load, on the real kernel: answers from memory never wait for the
workers, users take turns at the workers, one decision serves every exec of the same file,
a flood past the cap is denied at once, and an error in the loop costs one exec, not the loop.

Each test mounts its own tmpfs, the backend marks only that mount, a liveness probe kills
the responder if an exec in scope waits too long, and everything is torn down in finally.
decide() follows a plan (tests/fanotify_fixtures.py): sleeps stand for slow verifications.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import List, Optional

import pytest

from tests.agent_fixtures import wait_for
from tests.fanotify_fixtures import Responder, install, own_tmpfs, responder, run
from tests.flood_fixtures import NOBODY, as_user

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="fanotify permission events need root"),
    pytest.mark.timeout(120),
]


def spawn(path: str, uid: Optional[int] = None) -> subprocess.Popen[bytes]:
    """An exec of ``path`` that waits (in the kernel) for the backend's answer."""
    return subprocess.Popen([*as_user(uid), "/bin/sh", "-c", 'exec "$0"', path],
                            stderr=subprocess.DEVNULL)


def finish(procs: List[subprocess.Popen[bytes]]) -> List[int]:
    try:
        return [p.wait(60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def calls_of(r: Responder, prefix: str) -> int:
    return sum(n for name, n in r.stats()[1].items() if name.startswith(prefix))


def test_an_allow_from_memory_never_waits_for_busy_workers() -> None:
    with own_tmpfs() as mnt:
        slow = [install(mnt, f"slow{i}") for i in range(4)]
        known = install(mnt, "known")
        plan = {f"slow{i}": "sleep:3:deny" for i in range(4)}
        with responder(mnt, plan=plan, lookup_plan={"known": True}, workers=2,
                       deadline_s=30.0, probe_limit_s=20.0) as r:
            waiting = [spawn(p) for p in slow]
            try:
                wait_for(lambda: calls_of(r, "slow") >= 2)  # both workers are busy
                assert run(known) == 0
                assert all(p.poll() is None for p in waiting)  # answered before any of them
            finally:
                assert set(finish(waiting)) == {126}
            stats, calls = r.stats()
            assert "known" not in calls and stats["cached"] >= 1


def test_users_take_turns_at_the_workers() -> None:
    flood_n, other_uid = 10, 1
    with own_tmpfs() as mnt:
        theirs = [install(mnt, f"flood{i}") for i in range(flood_n)]
        mine = install(mnt, "mine")
        plan = {f"flood{i}": "sleep:0.5:deny" for i in range(flood_n)}
        with responder(mnt, plan=plan, workers=1, deadline_s=60.0, probe_limit_s=20.0) as r:
            flood = [spawn(p, NOBODY) for p in theirs]
            try:
                wait_for(lambda: calls_of(r, "flood") >= 1)
                assert spawn(mine, other_uid).wait(60) == 0
                # one worker: first come, first served would have decided the whole flood
                # first. In turns, uid 1 waited for the flood's decision in hand, at most one
                # turn each of nobody and root (the liveness probe), and the worker may
                # have started nobody's next one by the time we look
                assert calls_of(r, "flood") <= 4
            finally:
                assert set(finish(flood)) == {126}
            assert r.stats()[1]["mine"] == 1


@pytest.mark.parametrize("shared", [True, False])
def test_execs_of_the_same_file_wait_for_one_verification(shared: bool) -> None:
    n = 10
    with own_tmpfs() as mnt:
        same = install(mnt, "same")
        with responder(mnt, plan={"same": "sleep:1:allow"}, deadline_s=30.0,
                       share_answers=shared, probe_limit_s=20.0) as r:
            procs = [spawn(same, NOBODY if i % 2 else None) for i in range(n)]
            assert finish(procs) == [0] * n
            stats, calls = r.stats()
            if shared:  # decided once, that answer for every exec waiting for it
                assert calls["same"] == 1 and stats["shared"] >= 1
                assert stats["decided"] + stats["shared"] >= n
            else:  # each decided for its own caller, one after another
                assert calls["same"] + stats["cached"] >= n and stats["shared"] == 0


def test_past_the_cap_execs_are_denied_at_once_never_allowed() -> None:
    n, cap = 8, 3
    with own_tmpfs() as mnt:
        paths = [install(mnt, f"slow{i}") for i in range(n)]
        plan = {f"slow{i}": "sleep:1:allow" for i in range(n)}
        # on_timeout allow: the cap must deny anyway (a flood must not open the door)
        with responder(mnt, plan=plan, workers=1, deadline_s=30.0, on_timeout_allow=True,
                       max_pending=cap, max_per_uid=cap, probe_limit_s=20.0) as r:
            codes = finish([spawn(p) for p in paths])
            stats, calls = r.stats()
            assert codes.count(0) <= cap and codes.count(0) == sum(calls.get(
                f"slow{i}", 0) for i in range(n)), (codes, calls)
            assert codes.count(126) >= n - cap and stats["overload"] >= n - cap, stats
            assert stats["max_pending"] == cap and stats["timeout"] == 0


def test_a_bug_in_the_loop_denies_one_exec_and_the_loop_goes_on() -> None:
    with own_tmpfs() as mnt:
        buggy = install(mnt, "buggy")
        with responder(mnt, break_events={"buggy": 1}, watchdog_stall_s=1.0) as r:
            with pytest.raises(PermissionError):
                run(buggy)  # the broken event: denied, never left waiting
            assert run(buggy) == 0  # the loop lives on
            stats, _ = r.stats()
            assert stats["loop_errors"] == 1 and stats["error"] == 1
            assert "broken on purpose" in str(stats["last_error"])
            time.sleep(0.5)
            assert r.proc.is_alive()
