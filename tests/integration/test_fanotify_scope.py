"""Scope resolution, /proc reads and event parsing of the fanotify backend: bad input gives
a clear error naming the problem, never a crash and never a mark on the wrong mount."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from agent.errors import InputError
from agent.sensors import fanotify_scope as scope
from agent.sensors import fanotify_sys as fs
from agent.sensors.fanotify_backend import FanotifyBackend


def _never(*_: object) -> bool:
    raise AssertionError("decide must not run")


def test_bad_scopes_name_the_problem(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    for bad, problem in [
        (str(tmp_path / "missing"), "not an existing directory"),
        (str(f), "not an existing directory"),
    ]:
        with pytest.raises(InputError) as e:
            FanotifyBackend([bad], _never, 1.0, False)
        assert e.value.path == bad and problem in str(e.value)
    with pytest.raises(InputError, match="no scope given"):
        FanotifyBackend([], _never, 1.0, False)
    with pytest.raises(ValueError, match="deadline_s must be positive"):
        FanotifyBackend([str(tmp_path)], _never, 0, False)


def test_resolve_picks_the_holding_mount_and_the_mounts_below(tmp_path: Path) -> None:
    (tmp_path / "a b" / "sub").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    a = tmp_path / "a b"
    info = tmp_path / "mountinfo"
    esc = str(a).replace(" ", "\\040")
    info.write_text(
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        f"2 1 0:5 / {esc} rw - tmpfs t rw\n"
        f"3 2 0:6 / {esc}/sub rw - tmpfs t rw\n"
    )
    got = scope.resolve([str(a)], str(info))
    assert got.dirs == (str(a),) and got.mounts == (str(a), f"{a}/sub")
    assert not got.filtered  # the scope is a mount point: no prefix filter needed
    got = scope.resolve([str(tmp_path / "other"), str(a)], str(info))
    assert got.mounts == ("/", str(a), f"{a}/sub") and got.filtered


def test_under_is_a_path_prefix_not_a_string_prefix() -> None:
    assert scope.under("/srv/app/bin", "/srv/app")
    assert scope.under("/srv/app", "/srv/app")
    assert not scope.under("/srv/application/bin", "/srv/app")
    assert scope.under("/anything", "/")


def test_proc_reads_are_best_effort() -> None:
    me = scope.proc_info(os.getpid())
    assert me.ppid == os.getppid() and me.uid == os.getuid() and me.comm
    child = subprocess.Popen(["sleep", "5"])
    try:
        assert scope.descends_from(child.pid, os.getpid())
        assert scope.descends_from(child.pid, os.getppid())  # a grandchild
        assert not scope.descends_from(os.getpid(), child.pid)
        assert not scope.descends_from(child.pid, 2**22 + 7)
    finally:
        child.kill()
        child.wait()
    gone = scope.proc_info(2**22 + 7)  # above pid_max: no such process
    assert gone == scope.ProcInfo(-1, -1, -1, "")
    assert scope.parent_of(2**22 + 7) == (-1, -1)


def test_parse_events_rejects_what_the_kernel_never_sends() -> None:
    one = struct.pack("=IBBHQii", 24, 3, 0, 24, fs.FAN_OPEN_EXEC_PERM, 7, 1234)
    events, err = fs.parse_events(one + one)
    assert err == "" and events == [fs.Event(fs.FAN_OPEN_EXEC_PERM, 7, 1234)] * 2
    wrong = struct.pack("=IBBHQii", 24, 9, 0, 24, fs.FAN_OPEN_EXEC_PERM, 8, 1)
    events, err = fs.parse_events(one + wrong)
    assert len(events) == 1 and "metadata version 9" in err
    events, err = fs.parse_events(one + b"\0" * 5)
    assert len(events) == 1 and "ends inside an event" in err
    events, err = fs.parse_events(struct.pack("=IBBHQii", 0, 3, 0, 24, 0, 1, 1))
    assert events == [] and "length 0" in err  # a zero length would loop forever


def test_group_marks_tells_filesystem_mount_and_inode_marks_apart(tmp_path: Path) -> None:
    """An inode mark's fdinfo line names its filesystem too (sdev:): it must not read as a
    filesystem mark (FsMarks would lose the filesystem's real mask)."""
    target = tmp_path / "f"
    target.write_bytes(b"x")
    group = fs.fanotify_init(fs.FAN_CLOEXEC | fs.FAN_NONBLOCK, fs.EVENT_F_FLAGS)
    fd = os.open(str(tmp_path), os.O_PATH)
    try:
        notify_exec = 0x00001000  # FAN_OPEN_EXEC: a notification, nothing ever waits
        fs.mark_through_fd(group, fs.FAN_MARK_ADD | fs.FAN_MARK_MOUNT, notify_exec, fd)
        fs.fanotify_mark(group, fs.FAN_MARK_ADD, notify_exec, fs.AT_FDCWD, str(target))
        got = fs.group_marks(group)
        assert got.filesystems == {} and got.inodes == 1
        assert list(got.mounts.values()) == [notify_exec]
        fs.mark_through_fd(group, fs.FAN_MARK_ADD | fs.FAN_MARK_FILESYSTEM, notify_exec, fd)
        got = fs.group_marks(group)
        assert got.filesystems == {os.stat(tmp_path).st_dev: notify_exec}
        assert got.inodes == 1 and len(got.mounts) == 1
    finally:
        os.close(fd)
        os.close(group)
