"""The fanotify backend on the real kernel: allow, deny, deadlines, exemptions, and ignore
marks only where every write-open removes them first (a write-guarded tmpfs).

Each test mounts its own tmpfs, the backend marks only that filesystem, a liveness probe
kills the responder if an exec in scope waits too long, and everything is torn down in
finally.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from agent.sensors import fanotify_sys as fs
from tests.fanotify_fixtures import install, own_tmpfs, responder, run

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="fanotify permission events need root"),
    pytest.mark.timeout(90),
]


def test_allow_runs_deny_gets_eperm_and_the_event_is_filled_in() -> None:
    with own_tmpfs() as mnt:
        ok, bad = install(mnt, "ok"), install(mnt, "bad")
        with responder(mnt, plan={"ok": "elf", "bad": "deny"}) as r:
            assert r.ready_stats["mask"] == "FAN_OPEN_EXEC_PERM"
            # the tmpfs as a whole (FAN_MARK_FILESYSTEM, with every open: the write guard),
            # nothing else, no inode mark yet
            assert r.ready_stats["marked_filesystems"] == 1
            assert r.ready_stats["write_guarded_filesystems"] == 1
            # and its mount (fanotify_marks.py: no other group's mark may be the pinned one)
            assert r.ready_stats["marked_mounts"] == 1 and r.ready_stats["marked_inodes"] == 0
            assert run(ok) == 0
            with pytest.raises(PermissionError):
                run(bad)
            stats, calls = r.stats()
            assert calls["ok"] == 1 and calls["bad"] == 1
            assert stats["decided"] >= 2 and stats["denied"] == 1
            ev, st = r.seen["ok"], os.stat(ok)
            assert ev.path == ok and ev.backend == "fanotify-exec"
            assert (ev.identity.dev, ev.identity.ino) == (st.st_dev, st.st_ino)
            assert (ev.identity.ctime_ns, ev.identity.size) == (st.st_ctime_ns, st.st_size)
            assert ev.uid == 0 and ev.ppid == os.getpid() and ev.comm
            assert ev.pid > 0 and ev.auid >= 0
            assert ("decided", False, "bad") in {o[:3] for o in r.settle()}


@pytest.mark.parametrize("on_timeout_allow", [True, False])
def test_slow_decision_gets_the_on_timeout_answer_within_the_deadline(
    on_timeout_allow: bool,
) -> None:
    deadline = 0.5
    with own_tmpfs() as mnt:
        slow = install(mnt, "slow")
        late_answer = "deny" if on_timeout_allow else "allow"  # opposite of the timeout answer
        plan = {"slow": f"sleep:2:{late_answer}"}
        with responder(
            mnt, plan=plan, deadline_s=deadline, on_timeout_allow=on_timeout_allow
        ) as r:
            t0 = time.monotonic()
            if on_timeout_allow:
                assert run(slow) == 0
            else:
                with pytest.raises(PermissionError):
                    run(slow)
            assert time.monotonic() - t0 < deadline + 2.0  # answered at the deadline
            stats, _ = r.stats()
            assert stats["timeout"] == 1
            end = time.monotonic() + 5
            while ("late", not on_timeout_allow, "slow") not in {o[:3] for o in r.outcomes}:
                assert time.monotonic() < end, f"no late result in {r.outcomes}"
                r.settle(0.2)
            stats, _ = r.stats()
            assert stats["late"] == 1 and stats["pending"] == 0


def test_decide_raising_denies() -> None:
    with own_tmpfs() as mnt:
        boom = install(mnt, "boom")
        with responder(mnt, plan={"boom": "raise"}) as r:
            with pytest.raises(PermissionError):
                run(boom)
            stats, _ = r.stats()
            assert stats["error"] == 1


def test_exempt_pid_and_the_responders_children_are_not_asked() -> None:
    with own_tmpfs() as mnt:
        bad = install(mnt, "bad")
        # A shell that waits, then execs the file: its pid is in the exempt set.
        sh = subprocess.Popen(
            ["/bin/sh", "-c", 'read line; exec "$0"', bad], stdin=subprocess.PIPE
        )
        try:
            with responder(mnt, plan={"bad": "deny"}, exempt_pids=[sh.pid]) as r:
                assert sh.stdin is not None
                sh.stdin.write(b"go\n")
                sh.stdin.close()
                assert sh.wait(20) == 0
                assert r.exec_as_child(bad) == 0  # a descendant of the agent
                stats, calls = r.stats()
                assert "bad" not in calls
                # the exempt pid and the descendant: their execs; the opens of those execs
                # went to the write guard's own group (fanotify_marks.py), which answered
                # them (the descendant's open is not exempt by pid: a write-open there must
                # still be seen), never the exec group
                assert stats["exempt"] == 2 and stats["opened"] == 0
                assert stats["guard_events"] >= 2 and stats["write_guard"]["state"] == "running"
                with pytest.raises(PermissionError):  # everyone else is still asked
                    run(bad)
        finally:
            sh.kill()
            sh.wait()


def test_open_perm_fallback_and_own_opens_never_deadlock() -> None:
    """FAN_OPEN_PERM (old kernels) asks about every open. decide() here opens the file by
    path, as a verifier reading a .sig does: the agent's own open must be let through
    before anything else (the fapolicyd deadlock), or this exec would hang."""
    with own_tmpfs() as mnt:
        sig, bad = install(mnt, "reads-itself"), install(mnt, "bad")
        data = os.path.join(mnt, "data.txt")
        with open(data, "w") as f:
            f.write("not executable\n")
        plan = {"reads-itself": "reopen", "bad": "deny"}
        with responder(mnt, plan=plan, mask=fs.FAN_OPEN_PERM, deadline_s=3.0) as r:
            assert r.ready_stats["mask"] == "FAN_OPEN_PERM"
            t0 = time.monotonic()
            assert run(sig) == 0
            assert time.monotonic() - t0 < 2.5  # the own-pid open did not wait for a deadline
            with pytest.raises(PermissionError):
                run(bad)
            with open(data) as f:  # no x bit: cannot be exec'd, allowed at once
                assert f.read()
            stats, calls = r.stats()
            assert stats["exempt"] >= 1 and stats["timeout"] == 0
            assert stats["not-executable"] >= 1 and "data.txt" not in calls


def test_directory_scope_filters_the_rest_of_its_mount() -> None:
    with own_tmpfs() as mnt:
        inside = os.path.join(mnt, "scoped")
        os.mkdir(inside)
        bad_in, bad_out = install(inside, "bad"), install(mnt, "bad-outside")
        plan = {"bad": "deny", "bad-outside": "deny"}
        with responder(mnt, plan=plan, scope_dir=inside) as r:
            with pytest.raises(PermissionError):
                run(bad_in)
            assert run(bad_out) == 0
            stats, calls = r.stats()
            assert "bad-outside" not in calls and stats["out-of-scope"] >= 1


def test_ignore_mark_on_a_guarded_filesystem_and_every_write_open_removes_it() -> None:
    """On a tmpfs (write-guarded: every open reaches the loop) an allowed file carries an
    ignore mark: its next execs are not asked. Every open for write removes the mark before
    it is answered, so a change of any kind has the next exec asked again."""
    with own_tmpfs() as mnt:
        ok = install(mnt, "ok")
        with open(ok, "rb") as f:
            original = f.read()
        with responder(mnt) as r:
            for _ in range(5):
                assert run(ok) == 0
            stats, calls = r.stats()
            assert calls["ok"] == 1 and stats["ignore_marks"] >= 1
            assert stats["marked_inodes"] >= 1 and stats["write_guarded_filesystems"] == 1
            with open(ok, "ab") as f:  # append
                f.write(b"\0")
            assert run(ok) == 0
            assert r.stats()[1]["ok"] == 2
            with open(ok, "wb") as f:  # truncate, then the same bytes again
                f.write(original)
            assert run(ok) == 0
            assert r.stats()[1]["ok"] == 3
            fd = os.open(ok, os.O_WRONLY)  # an open for write alone, no byte written
            os.close(fd)
            assert run(ok) == 0
            stats, calls = r.stats()
            assert calls["ok"] == 4 and stats["ignore_marks_removed"] >= 3
            os.chmod(ok, 0o700)  # metadata only: the mark stays (the stamp-keyed memo of
            assert run(ok) == 0  # the runner would ask: docs/cache.md)
            assert r.stats()[1]["ok"] == 4
            other = install(mnt, "other")
            os.rename(other, ok)  # a new inode under the old name
            assert run(ok) == 0
            assert r.stats()[1]["ok"] == 5
        with responder(mnt, ignore_marks=False) as r:
            for _ in range(3):
                assert run(ok) == 0
            stats, calls = r.stats()
            assert calls["ok"] == 3 and stats["marked_inodes"] == 0


def test_file_changed_while_being_decided_is_denied() -> None:
    with own_tmpfs() as mnt:
        racy = install(mnt, "racy")
        with responder(mnt, plan={"racy": "sleep:0.6:allow"}, deadline_s=3.0) as r:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", 'exec "$0"', racy], stderr=subprocess.PIPE
            )
            time.sleep(0.2)  # decide() is sleeping; the file is not yet write-protected
            with open(racy, "ab") as f:
                f.write(b"\0")
            assert proc.wait(20) != 0
            assert proc.stderr is not None
            assert b"Operation not permitted" in proc.stderr.read()
            stats, _ = r.stats()
            assert stats["changed"] == 1


def test_lookup_answers_on_the_loop_without_decide() -> None:
    with own_tmpfs() as mnt:
        known_bad, known_ok, other = (install(mnt, n) for n in ("known-bad", "known-ok", "other"))
        lookup = {"known-bad": False, "known-ok": True}
        with responder(mnt, plan={"known-bad": "allow"}, lookup_plan=lookup) as r:
            for _ in range(3):
                with pytest.raises(PermissionError):
                    run(known_bad)
                assert run(known_ok) == 0
            assert run(other) == 0
            stats, calls = r.stats()
            assert "known-bad" not in calls and "known-ok" not in calls and calls["other"] == 1
            # 3 denials from memory, 1 allow from memory that leaves an ignore mark (added
            # on the loop before the answer: the next execs are the kernel's)
            assert stats["cached"] == 4 and stats["ignore_marks"] >= 1


def test_a_saturated_worker_pool_still_answers_every_exec_at_the_deadline() -> None:
    deadline, n = 0.5, 6
    with own_tmpfs() as mnt:
        paths = [install(mnt, f"slow{i}") for i in range(n)]
        plan = {f"slow{i}": "sleep:3:deny" for i in range(n)}
        with responder(mnt, plan=plan, deadline_s=deadline, workers=2) as r:
            t0 = time.monotonic()
            procs = [subprocess.Popen(["/bin/sh", "-c", 'exec "$0"', p]) for p in paths]
            try:
                assert [p.wait(20) for p in procs] == [0] * n  # on_timeout: allow
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            assert time.monotonic() - t0 < deadline + 2.0  # not n / workers * 3 s
            assert r.stats()[0]["timeout"] >= n  # the liveness probe may queue behind them too
