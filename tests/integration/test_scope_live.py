"""agent/scope against real mounts on this host: bind mounts, another mount namespace, an
overlay, a mount the agent never sees, and the mount watcher.

Nothing enforces here: the tracker only answers where files are. Every mount is made below
the test's own tmpfs or temporary directory (or inside a private namespace of a child), and
undone in ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from agent.scope import FsClass, MountWatcher, ScopeTracker
from agent.scope.live import UNPLACED, judged_in_scope
from tests.agent_fixtures import scoped_tmpfs

pytestmark = pytest.mark.timeout(60)


@contextlib.contextmanager
def mounted(*argv: str) -> Iterator[None]:
    where = argv[-1]
    subprocess.run(["mount", *argv], check=True, capture_output=True, timeout=10)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", where], capture_output=True, timeout=10)


@contextlib.contextmanager
def in_own_namespace(script: str) -> Iterator[int]:
    """A child in a private mount namespace that runs ``script`` and then sleeps: its pid."""
    child = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                              script + "; echo ready; exec sleep 30"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        yield child.pid
    finally:
        child.kill()
        child.wait(timeout=10)


def place(tracker: ScopeTracker, path: Path, pid: int | None = None):  # type: ignore[no-untyped-def]
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return tracker.place_fd(fd, os.readlink(f"/proc/self/fd/{fd}"), pid)
    finally:
        os.close(fd)


class _Everything:
    """A policy whose only scope glob is /opt/app: a foreign path matches no glob."""

    def in_scope(self, path: str) -> bool:
        return path.startswith("/opt/app/")

    def scope_roots(self) -> tuple[str, ...]:
        return ("/opt/app",)


@pytest.fixture
def scope(tmp_path: Path) -> Iterator[Path]:
    with scoped_tmpfs("16m") as where:
        (where / "app").mkdir()
        (where / "app" / "tool").write_bytes(b"\x7fELF")
        (where / "other").mkdir()
        (where / "other" / "data").write_bytes(b"x")
        yield where


def test_a_bind_mount_of_the_scope_is_judged_at_the_scope_path(scope: Path,
                                                              tmp_path: Path) -> None:
    view = tmp_path / "view"
    view.mkdir()
    with mounted("--bind", str(scope / "app"), str(view)):
        tracker = ScopeTracker([str(scope / "app")])
        tracker.refresh()
        got = place(tracker, view / "tool")
        assert got.in_scope and got.path == str(scope / "app" / "tool")
        assert tracker.view.class_of(got.dev) is FsClass.PARTIAL
        outside = place(tracker, scope / "other" / "data")
        assert not outside.in_scope and outside.path == str(scope / "other" / "data")


def test_the_scope_reached_from_another_namespace_is_placed_through_its_mount_table(
        scope: Path) -> None:
    tracker = ScopeTracker([str(scope / "app")])
    tracker.refresh()
    with in_own_namespace("true") as pid:
        got = place(tracker, Path(f"/proc/{pid}/root{scope}/app/tool"), pid)
        assert got.in_scope and got.path == str(scope / "app" / "tool")
        # a private namespace of a system service: its execs of files outside every scope
        # stay outside (never "in scope" just for coming through another namespace)
        system = place(tracker, Path(f"/proc/{pid}/root/usr/bin/true"), pid)
        assert not system.in_scope and system.path == "/usr/bin/true"


def test_a_filesystem_only_another_namespace_has_is_in_scope(scope: Path,
                                                             tmp_path: Path) -> None:
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    tracker = ScopeTracker([str(scope / "app")])
    tracker.refresh()
    with in_own_namespace(f"mount -t tmpfs eg-hidden {hidden} && "
                          f"echo x > {hidden}/payload") as pid:
        got = place(tracker, Path(f"/proc/{pid}/root{hidden}/payload"), pid)
        assert got.in_scope and got.fs_path == "/payload"
        assert tracker.view.class_of(got.dev) is FsClass.IN  # unseen: in scope
        # the path is one that namespace chose: rules by path must not match it (a tmpfs
        # mounted at an allowed path in one's own namespace earns no allow)
        assert not got.trusted and got.judged_path == f"{UNPLACED}{hidden}/payload"
        assert judged_in_scope(got, _Everything())


def test_an_overlay_with_a_layer_in_scope_is_in(scope: Path, tmp_path: Path) -> None:
    for sub in ("upper", "work", "merged"):
        (tmp_path / sub).mkdir()
    opts = f"lowerdir={scope / 'app'},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}"
    with mounted("-t", "overlay", "eg-ov", "-o", opts, str(tmp_path / "merged")):
        tracker = ScopeTracker([str(scope / "app")])
        tracker.refresh()
        dev = os.stat(tmp_path / "merged").st_dev
        assert tracker.view.class_of(dev) is FsClass.IN
        assert place(tracker, tmp_path / "merged" / "tool").in_scope


def test_the_mount_watcher_sees_a_tmpfs_mounted_inside_the_scope(scope: Path) -> None:
    tracker = ScopeTracker([str(scope)])
    tracker.refresh()
    changes: List[float] = []
    seen = threading.Event()

    def changed() -> None:
        tracker.refresh()
        changes.append(time.monotonic())
        if any(m.point == str(scope / "app") for m in tracker._mounts):
            seen.set()

    watcher = MountWatcher(changed, every_s=30)
    watcher.start()
    try:
        time.sleep(0.2)
        with mounted("-t", "tmpfs", "eg-new", str(scope / "app")):
            assert seen.wait(5), "the watcher did not wake for a new mount"
            assert tracker.view.class_of(os.stat(scope / "app").st_dev) is FsClass.IN
    finally:
        watcher.stop()
    assert watcher.wakeups >= 1
