"""fanotify-exec judges files, not mounts: filesystem marks, placement of every event, marks
kept current by the mount watcher, and no ignore mark that outlives a write (docs/fanotify.md,
"Marks" and "Ignore marks, and writes through a mapping").

Each test scopes the backend to a tmpfs it mounts itself; every other mount it makes is
below that tmpfs, a second tmpfs of its own or a directory of its own, all undone in
finally. A liveness probe kills the responder if an exec in scope waits too long. Nothing
here puts a mark on the root filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator

import pytest

from tests.fanotify_fixtures import Responder, install, own_ext4, own_tmpfs, responder, run

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="fanotify permission events need root"),
    pytest.mark.timeout(120),
]
DENIED = 126  # util-linux and sh: the exec they were asked for failed with EPERM


@contextlib.contextmanager
def bound(source: str) -> Iterator[str]:
    """``source`` bound onto a fresh directory of /tmp (outside every scope)."""
    where = tempfile.mkdtemp(prefix="execguard-fan-view-")
    subprocess.run(["mount", "--bind", source, where], check=True, timeout=10)
    try:
        yield where
    finally:
        if subprocess.run(["umount", where], timeout=10, check=False).returncode != 0:
            subprocess.run(["umount", "-l", where], timeout=10, check=False)
        os.rmdir(where)


@contextlib.contextmanager
def mounted_tmpfs(where: str) -> Iterator[str]:
    os.makedirs(where, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "execguard-fan-new",
                    where], check=True, timeout=10)
    try:
        yield where
    finally:
        if subprocess.run(["umount", where], timeout=10, check=False).returncode != 0:
            subprocess.run(["umount", "-l", where], timeout=10, check=False)


def in_private_namespace(script: str, *args: str) -> int:
    """A shell script in a mount namespace of its own (its mounts never reach ours)."""
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *args], timeout=20,
                          check=False, capture_output=True).returncode


def wait_stats(r: Responder, ok: Callable[[Dict[str, Any]], bool], timeout: float = 10.0
               ) -> float:
    """Seconds until the backend's stats satisfy ``ok``."""
    t0 = time.monotonic()
    while True:
        stats, _ = r.stats()
        if ok(stats):
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"stats never got there: {stats}"
        time.sleep(0.02)


def test_a_bind_mount_of_the_scope_elsewhere_is_judged_at_its_scope_path() -> None:
    with own_tmpfs() as mnt:
        bad, ok = install(mnt, "bad"), install(mnt, "ok")
        with responder(mnt, plan={"bad": "deny"}) as r, bound(mnt) as view:
            with pytest.raises(PermissionError):
                run(os.path.join(view, "bad"))
            assert run(os.path.join(view, "ok")) == 0
            stats, calls = r.stats()
            assert calls["bad"] == 1 and r.seen["bad"].path == bad  # canonical: the scope's
            assert r.seen["ok"].path == ok
            assert stats["marked_filesystems"] == 1


def test_other_mount_namespaces_are_judged_at_the_scope_path() -> None:
    """The scope's filesystem is marked, not its mount: an exec through the copy of the
    mount in a new namespace, or through a bind mount made only there (placed through the
    caller's own mount table), waits for the agent like any other."""
    with own_tmpfs() as mnt:
        bad = install(mnt, "bad")
        view = tempfile.mkdtemp(prefix="execguard-fan-ns-")
        try:
            with responder(mnt, plan={"bad": "deny"}) as r:
                assert subprocess.run(["unshare", "-m", bad], timeout=20, check=False,
                                      capture_output=True).returncode == DENIED
                assert in_private_namespace('mount --bind "$1" "$2" || exit 70\n'
                                            'exec "$2/bad"', mnt, view) == DENIED
                _, calls = r.stats()
                assert calls["bad"] == 2 and r.seen["bad"].path == bad
        finally:
            os.rmdir(view)


def test_a_partial_scope_judges_its_files_through_any_mount_and_lets_siblings_run() -> None:
    """A scope that is a directory of a filesystem: the filesystem is marked, the files
    outside the scope directory are answered at once (never decided), whichever mount
    shows them; the files inside are judged through every mount."""
    with own_tmpfs() as mnt:
        inside = os.path.join(mnt, "scoped")
        os.mkdir(inside)
        install(inside, "bad")
        install(mnt, "sibling")
        plan = {"bad": "deny", "sibling": "deny"}
        with responder(mnt, plan=plan, scope_dir=inside) as r, bound(mnt) as view:
            for base in (mnt, view):
                assert run(os.path.join(base, "sibling")) == 0
                with pytest.raises(PermissionError):
                    run(os.path.join(base, "scoped", "bad"))
            stats, calls = r.stats()
            assert "sibling" not in calls and calls["bad"] == 2
            assert stats["out-of-scope"] >= 2 and stats["marked_filesystems"] == 1


def test_a_tmpfs_mounted_inside_the_scope_is_marked_once_the_watcher_sees_it() -> None:
    with own_tmpfs() as mnt, responder(mnt, plan={"bad": "deny"}) as r:
        assert r.ready_stats["marked_filesystems"] == 1
        sub = os.path.join(mnt, "sub")
        with mounted_tmpfs(sub):
            window = wait_stats(r, lambda s: s["marked_filesystems"] == 2)
            bad = install(sub, "bad")
            with pytest.raises(PermissionError):
                run(bad)
            stats, calls = r.stats()
            assert calls["bad"] == 1 and stats["mount_watch"] == "running"
            assert window < 5.0  # the watcher woke on the change, not on its timer
        # unmounted: the filesystem and its mark are gone
        wait_stats(r, lambda s: s["marked_filesystems"] == 1)


def test_a_filesystem_partly_in_scope_through_a_bind_mount_is_marked_then_unmarked() -> None:
    """A directory of another filesystem bound into the scope puts that filesystem partly in
    scope: it is marked as a whole (its scope files are judged through its own mount too,
    its other files run at once), and unmarked once the bind mount is gone."""
    with own_tmpfs() as mnt, own_tmpfs() as other:
        kit = os.path.join(other, "kit")
        os.mkdir(kit)
        install(kit, "bad")
        install(other, "loose")
        with responder(mnt, plan={"bad": "deny", "loose": "deny"}) as r:
            where = os.path.join(mnt, "kit")
            os.mkdir(where)
            subprocess.run(["mount", "--bind", kit, where], check=True, timeout=10)
            try:
                wait_stats(r, lambda s: s["marked_filesystems"] == 2)
                for path in (os.path.join(where, "bad"), os.path.join(kit, "bad")):
                    with pytest.raises(PermissionError):
                        run(path)
                assert run(os.path.join(other, "loose")) == 0
                stats, calls = r.stats()
                assert calls["bad"] == 2 and "loose" not in calls
            finally:
                subprocess.run(["umount", where], timeout=10, check=False)
            stats_after = wait_stats(r, lambda s: s["marked_filesystems"] == 1)
            assert stats_after < 10
            assert run(os.path.join(kit, "bad")) == 0  # out of scope again: not even asked
            stats, calls = r.stats()
            assert calls["bad"] == 2 and stats["filesystems_unmarked"] >= 1


def test_a_write_through_a_shared_mapping_into_an_allowed_binary_is_seen() -> None:
    """The allowed binary's ignore mark goes at the open for write that precedes the
    mapping (the loop sees it first), so the exec after a write through a MAP_SHARED
    mapping (whose pages came in by a read fault: no new stamp on tmpfs) is decided again,
    from the new bytes, and denied."""
    with own_tmpfs() as mnt:
        app = install(mnt, "app")
        with open(app, "rb") as fh:
            allowed = hashlib.sha256(fh.read()).hexdigest()
        with responder(mnt, plan={"app": f"sha:{allowed}"}) as r:
            assert run(app) == 0
            before = os.stat(app)
            fd = os.open(app, os.O_RDWR)
            try:
                with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                    middle = len(m) // 2
                    assert m[middle: middle + 8]  # the read fault maps the page writable
                    m[middle: middle + 8] = b"EG-PWNED"
            finally:
                os.close(fd)
            after = os.stat(app)
            assert (before.st_ctime_ns, before.st_mtime_ns, before.st_size) == \
                (after.st_ctime_ns, after.st_mtime_ns, after.st_size)  # no new stamp
            with pytest.raises(PermissionError):
                run(app)
            stats, calls = r.stats()
            assert calls["app"] == 2 and stats["marked_inodes"] == 0
            assert stats["write_opens"] >= 1 and stats["ignore_marks_removed"] >= 1
            assert stats["write_guarded_filesystems"] == 1


def test_on_a_filesystem_whose_stamps_follow_writes_no_ignore_mark_is_placed() -> None:
    """ext4 (a loop image of the test's own): no write guard (no FAN_OPEN_PERM: every open
    of a partly scoped root filesystem would wait for the agent), so no ignore mark either:
    every exec is asked, and a write through a mapping changes the stamp there."""
    with own_ext4() as mnt:
        app = install(mnt, "app")
        with open(app, "rb") as fh:
            allowed = hashlib.sha256(fh.read()).hexdigest()
        with responder(mnt, plan={"app": f"sha:{allowed}"}) as r:
            for _ in range(3):
                assert run(app) == 0
            stats, calls = r.stats()
            assert calls["app"] == 3 and stats["marked_inodes"] == 0
            assert stats["write_guarded_filesystems"] == 0 and stats["opened"] == 0
            before = os.stat(app)
            fd = os.open(app, os.O_RDWR)
            try:
                with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                    middle = len(m) // 2
                    assert m[middle: middle + 8]
                    m[middle: middle + 8] = b"EG-PWNED"
            finally:
                os.close(fd)
            assert os.stat(app).st_ctime_ns != before.st_ctime_ns  # page_mkwrite: new stamp
            with pytest.raises(PermissionError):
                run(app)


def test_marks_never_go_on_pseudo_filesystems_or_outside_the_scopes() -> None:
    with own_tmpfs() as mnt:
        shutil.copyfile("/bin/true", os.path.join(mnt, "t"))
        with responder(mnt) as r:
            stats, _ = r.stats()
            assert stats["marked"] == [m for m in stats["marked"] if "tmpfs" in m]
            assert stats["marked_filesystems"] == 1 and stats["unmarkable"] == {}
            assert stats["mark_fallbacks"] == {}


def test_an_exec_through_an_overlay_of_a_guarded_tmpfs_is_answered_at_once() -> None:
    """The overlay's file, opened by the kernel for our read of its exec event, opens its
    lower file on the scope's tmpfs: an open event of the write guard, answered on the
    guard's own thread. In one group the loop waited for itself (6.18: the exec hung until
    the watchdog killed the agent). The overlay holds the scope's file: its exec is asked
    and denied, a plain read of it passes, and the deny comes within seconds."""
    with own_tmpfs() as mnt, own_tmpfs() as other:
        os.makedirs(os.path.join(mnt, "layer"))
        install(os.path.join(mnt, "layer"), "bad")
        upper, work, merged = (os.path.join(other, d) for d in ("upper", "work", "merged"))
        for d in (upper, work, merged):
            os.makedirs(d)
        opts = f"lowerdir={os.path.join(mnt, 'layer')},upperdir={upper},workdir={work}"
        with responder(mnt, plan={"bad": "deny"}) as r:
            subprocess.run(["mount", "-t", "overlay", "execguard-fan-ovl", "-o", opts, merged],
                           check=True, timeout=10)
            try:
                t0 = time.monotonic()
                with pytest.raises(PermissionError):
                    run(os.path.join(merged, "bad"))
                assert time.monotonic() - t0 < 5.0
                with open(os.path.join(merged, "bad"), "rb") as fh:
                    assert fh.read(4) == b"\x7fELF"
                stats, calls = r.stats()
                assert calls["bad"] >= 1 and stats["write_guard"]["state"] == "running"
                assert stats["guard_events"] >= 1
            finally:
                subprocess.run(["umount", "-l", merged], timeout=10, check=False)


def test_an_allow_decided_across_a_write_open_leaves_no_ignore_mark() -> None:
    """On tmpfs the stamp does not prove the bytes (a write through a mapping keeps it):
    a write-open counted by the guard while the file was being decided means the verdict
    may cover other bytes, so the allow is taken back (CHANGED: denied, no ignore mark),
    even though ctime and size did not move. The next exec is decided again and marked."""
    with own_tmpfs() as mnt:
        app = install(mnt, "app")
        with responder(mnt, plan={"app": "write-open-once"}) as r:
            with pytest.raises(PermissionError):
                run(app)
            stats, calls = r.stats()
            assert stats["changed"] == 1 and stats["marked_inodes"] == 0
            assert stats["write_opens"] >= 1
            assert run(app) == 0
            stats, calls = r.stats()
            assert calls["app"] == 2 and stats["marked_inodes"] == 1


HOLD_LEASE = """
import fcntl, os, signal, sys, time
signal.signal(signal.SIGIO, signal.SIG_IGN)  # never give the lease back
fd = os.open(sys.argv[1], os.O_RDWR)
for _ in range(200):  # EAGAIN while the guard still holds its event fd of our own open
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        break
    except BlockingIOError:
        time.sleep(0.01)
else:
    sys.exit("no lease")
print("held", flush=True)
time.sleep(60)
"""


def test_a_fifo_or_a_leased_file_on_a_guarded_tmpfs_cannot_hold_the_guard() -> None:
    """The kernel opens each event's file in the reading thread: a FIFO without a writer, or
    a file under another process's write lease, would hold that open (the lease up to
    fs.lease-break-time, 45 s) and every open of the filesystem behind it; on the exec loop
    the watchdog would then kill the agent. The event fds are non-blocking: the FIFO's open
    returns at once, the leased file's open and exec fail (the kernel denies those events),
    and everyone else's opens and execs go on."""
    with own_tmpfs() as mnt:
        other = install(mnt, "other")
        fifo = os.path.join(mnt, "fifo")
        os.mkfifo(fifo)
        leased = install(mnt, "leased")
        with responder(mnt, plan={}) as r:
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # no writer, ever
            os.close(fd)
            holder = subprocess.Popen([sys.executable, "-c", HOLD_LEASE, leased],
                                      stdout=subprocess.PIPE, text=True)
            try:
                assert holder.stdout is not None and holder.stdout.readline() == "held\n"
                t0 = time.monotonic()
                blocked = subprocess.run(["/bin/sh", "-c", 'exec 3<"$0"', leased],
                                         timeout=60, check=False)
                assert time.monotonic() - t0 < 5.0 and blocked.returncode != 0
                t0 = time.monotonic()  # its exec: the loop's own read fails the same way
                with pytest.raises(PermissionError):
                    run(leased)
                assert time.monotonic() - t0 < 5.0
                t0 = time.monotonic()
                with open(other, "rb") as fh:
                    assert fh.read(4) == b"\x7fELF"
                assert run(other) == 0
                assert time.monotonic() - t0 < 5.0
                stats, _ = r.stats()
                assert stats["write_guard"]["state"] == "running"
                assert stats["write_guard"]["silent_s"] < 2.0
            finally:
                holder.kill()
                holder.wait()
