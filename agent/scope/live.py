"""The scope kept current: the agent's mount table, read again whenever it changes.

``ScopeTracker`` turns the policy's scope roots and the mount table into a ``ScopeView``
(classify.py) and into what the kernel programs need: the class of every filesystem and the
(dev, ino) of each scope root inside a PARTIAL filesystem. ``MountWatcher`` wakes when the
agent's mount table changes (the kernel flags ``/proc/self/mountinfo`` with POLLPRI) and
every few seconds anyway, so a missed wake-up costs seconds, never a stale view forever.

Only the agent's own mount namespace is read: a mount that exists only in another namespace
is never placed here, so it stays unseen, and unseen filesystems are in scope by default.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat
import threading
from typing import (
    Callable,
    Dict,
    FrozenSet,
    List,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Set,
    Tuple,
)

from agent.scope.classify import FsClass, ScopeView, classify
from agent.scope.mountinfo import MOUNTINFO, Mount, join, read, under

DirKey = Tuple[int, int]  # (st_dev, st_ino) of a directory


class Placement(NamedTuple):
    """Where an open file is, as the agent sees it."""

    dev: int
    fs_path: Optional[str]  # the path within its filesystem; None: not through our mounts
    path: str  # the path to judge by: canonical in the agent's namespace when known
    in_scope: bool
    # the path is the agent's own (through its mounts); False: only the path the file had
    # in another namespace, or none at all, which whoever made that namespace chose
    trusted: bool = True

    @property
    def judged_path(self) -> str:
        """The path rules are matched against: a path another namespace chose is shown for
        what it is and matches no path glob (an allow by path must not be earned by mounting
        a tmpfs at an allowed path in one's own namespace)."""
        return self.path if self.trusted else UNPLACED + self.path


# An absolute path no policy glob is written for: a path only another namespace gives a file
# is judged under it (the policy's own "/**" still matches, as it matches every file)
UNPLACED = "/[not in the agent's mounts]"


class ScopeRules(Protocol):
    """What of a policy snapshot places a file: its scope globs and their fixed roots."""

    def in_scope(self, path: str) -> bool: ...

    def scope_roots(self) -> Tuple[str, ...]: ...


def judged_in_scope(place: Placement, rules: ScopeRules) -> bool:
    """Whether the policy judges a placed file: every backend's one rule. The policy's globs
    may narrow a filesystem in scope (scope /srv/*/bin on the root filesystem), but only for
    a path below a scope root: a file placed in scope with no such path (another namespace's
    mount, an overlay whose layer is in scope, no name) has nothing they could match, and is
    judged, never allowed as "outside every scope"."""
    return place.in_scope and (
        not place.trusted or place.fs_path is None or rules.in_scope(place.path)
        or not any(under(place.path, root) for root in rules.scope_roots()))


def fdinfo(fd: int) -> Dict[str, str]:
    """/proc/self/fdinfo/FD as a dict: ``mnt_id`` (3.15+), ``ino`` (5.14+), ..."""
    out: Dict[str, str] = {}
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def mount_id_of_fd(fd: int) -> Optional[int]:
    """The id of the mount an open file was reached through. os.open/os.read and a bytes
    search: half the cost of ``fdinfo`` (the fanotify loop places every event with it)."""
    try:
        info = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(info, 4096)
    except OSError:
        return None
    finally:
        os.close(info)
    start = text.find(b"\nmnt_id:")
    if start < 0:
        return None
    end = text.find(b"\n", start + 1)
    try:
        return int(text[start + 9 : None if end < 0 else end])
    except ValueError:
        return None


class ScopeTracker:
    """The current view for ``roots``; ``refresh`` rereads the mount table (thread-safe)."""

    def __init__(self, roots: Sequence[str],
                 read_mounts: Callable[[], List[Mount]] = read,
                 resolve: Callable[[str], str] = os.path.realpath) -> None:
        self.roots = tuple(sorted({resolve(r) for r in roots}))
        self._read, self._resolve = read_mounts, resolve
        self._lock = threading.Lock()
        self._mounts: List[Mount] = []
        self._by_id: Dict[int, Mount] = {}
        self.view = ScopeView({}, {}, self.roots)
        self.kernel_dirs: FrozenSet[DirKey] = frozenset()
        self.refreshes = 0

    def refresh(self) -> Tuple[ScopeView, ScopeView]:
        """(old view, new view) after rereading the mount table."""
        mounts = self._read()
        view = classify(mounts, self.roots, resolve=self._resolve)
        dirs = frozenset(_reachable_dirs(mounts, view))
        with self._lock:
            old = self.view
            self._mounts, self._by_id = mounts, {m.mount_id: m for m in mounts}
            self.view, self.kernel_dirs = view, dirs
            self.refreshes += 1
        return old, view

    def mount(self, mount_id: int) -> Optional[Mount]:
        with self._lock:
            return self._by_id.get(mount_id)

    def mounts(self) -> List[Mount]:
        """The mount table of the last refresh (the fanotify backend marks from it)."""
        with self._lock:
            return self._mounts

    def kernel_key(self, fd: int) -> Optional[DirKey]:
        """(dev, ino) of the open file as the kernel's hooks see it (``f_inode``): on an
        overlay, stat() reports the underlying file's device and inode for a regular file
        (a per-layer pseudo device when the layers are on different filesystems), while the
        kernel judges the overlay's own inode. fdinfo names both the mount (whose super block
        is the device) and the inode number the kernel has. None when this kernel's fdinfo
        has no ``ino`` (before 5.14) or the mount is not ours."""
        info = fdinfo(fd)
        try:
            m = self.mount(int(info["mnt_id"]))
            ino = int(info["ino"])
        except (KeyError, ValueError):
            return None
        return (m.dev, ino) if m is not None else None

    def place_fd(self, fd: int, path: str, pid: Optional[int] = None) -> Placement:
        """Where the open file ``fd`` (whose /proc/self/fd link reads ``path``) is. A file
        without a name is in scope: nothing proves it is outside. A file reached through a
        mount of another namespace is placed through ``pid``'s mount table (the process that
        opened it, in that namespace: a container's init exec'ing its rootfs) when that
        table names the mount; otherwise it is in scope, under the path it was seen at."""
        st = os.fstat(fd)
        mid = mount_id_of_fd(fd)
        m = self.mount(mid) if mid is not None else None
        if m is None and mid is not None and pid is not None:
            m = _foreign_mount(pid, mid)
        if m is None or st.st_nlink == 0 or path.endswith(" (deleted)") \
                or not under(path, m.point):
            return Placement(st.st_dev, None, path, True, trusted=False)
        rest = path if m.point == "/" else path[len(m.point):]
        fs_path = join(m.root, rest)
        view = self.view  # the mount's device, not st_dev: an overlay reports a layer's
        canonical = self._canonical(m.dev, fs_path)
        if canonical is None:
            # no mount of ours shows it (a filesystem, or a part of one, that only another
            # namespace has): in scope, at the path it had there
            return Placement(m.dev, fs_path, path, True, trusted=False)
        return Placement(m.dev, fs_path, canonical, view.in_scope(m.dev, fs_path))

    def paths_of(self, dev: int, fs_path: str) -> List[str]:
        """Every path through the agent's mounts of filesystem ``dev`` to ``fs_path``."""
        with self._lock:
            mounts = self._mounts
        out = []
        for m in mounts:
            if m.dev == dev and under(fs_path, m.root):
                out.append(join(m.point, fs_path if m.root == "/" else fs_path[len(m.root):]))
        return out

    def _canonical(self, dev: int, fs_path: str) -> Optional[str]:
        """The name to judge a file by: its path through one of the agent's mounts, through
        a mount inside a scope when one shows it (a file reached through a bind mount of the
        scope is judged at its scope path); None when no mount of the agent's shows it."""
        with self._lock:
            mounts = self._mounts
        shown: Optional[str] = None
        for m in mounts:
            if m.dev != dev or not under(fs_path, m.root):
                continue
            rest = fs_path if m.root == "/" else fs_path[len(m.root):]
            candidate = join(m.point, rest)
            if any(under(candidate, r) for r in self.roots):
                return candidate
            shown = shown or candidate
        return shown


def _foreign_mount(pid: int, mount_id: int) -> Optional[Mount]:
    """Mount ``mount_id`` as process ``pid``'s namespace shows it (its root field is the
    kernel's: which directory of its filesystem it shows), or None."""
    try:
        mounts = read(f"/proc/{pid}/mountinfo")
    except OSError:
        return None
    return next((m for m in mounts if m.mount_id == mount_id), None)


def _reachable_dirs(mounts: List[Mount], view: ScopeView) -> Set[DirKey]:
    """(dev, ino) of every in-scope directory of a PARTIAL filesystem that a mount of ours
    shows (a directory hidden under another mount cannot be stat'ed, and is not listed)."""
    out: Set[DirKey] = set()
    for dev, dirs in view.subtrees.items():
        for d in dirs:
            for m in mounts:
                if m.dev != dev or not under(d, m.root):
                    continue
                rest = d if m.root == "/" else d[len(m.root):]
                try:
                    st = os.stat(join(m.point, rest), follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
                    out.add((dev, st.st_ino))
                    break
    return out


class MountWatcher:
    """Calls ``on_change`` (on its own thread) whenever the agent's mount table changes, and
    every ``every_s`` seconds in any case. ``on_change`` must not raise; errors are counted."""

    def __init__(self, on_change: Callable[[], None], every_s: float = 5.0,
                 path: str = MOUNTINFO) -> None:
        self._on_change, self._every, self._path = on_change, every_s, path
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._wake_r, self._wake_w = -1, -1  # stop() wakes the poll: no wait for every_s
        self.wakeups = 0
        self.errors = 0

    def start(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="mount-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):  # full: a wake-up is already pending
                os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                return  # stuck in on_change: its wake pipe stays open for it
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.errors += 1
                self._stop.wait(self._every)
                continue
            try:
                self._watch(fd)
            finally:
                os.close(fd)

    def _watch(self, fd: int) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        if self._wake_r >= 0:
            poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                while os.read(fd, 65536):  # read to the end: arms the next POLLPRI
                    pass
                ready = poller.poll(int(self._every * 1000))
            except OSError:
                self.errors += 1
                return
            if self._stop.is_set():
                return
            self.wakeups += int(any(f == fd for f, _ in ready))
            try:
                self._on_change()
            except Exception:  # a listener bug must not end the watch
                self.errors += 1


def classes_diff(old: ScopeView, new: ScopeView) -> Tuple[Dict[int, FsClass], Set[int]]:
    """(devices whose class is new or changed, with it; devices gone from the table)."""
    changed = {d: c for d, c in new.classes.items() if old.classes.get(d) is not c}
    return changed, set(old.classes) - set(new.classes)
