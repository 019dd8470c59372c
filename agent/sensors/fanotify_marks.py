"""Which filesystems the fanotify group marks: every one the scope view puts (partly) in scope.

A scope is a set of files, wherever they are reached from (docs/threat-model.md, "Scope"), so
the marks go on filesystems, not mounts: ``FAN_MARK_FILESYSTEM`` on each filesystem that
``agent/scope`` classifies IN or PARTIAL, and every exec of one of its files waits for the
agent, through whatever mount, bind mount, namespace or detached mount (``open_tree``) it
comes. The loop then places each event (``ScopeTracker.place_fd``) and answers the files of a
PARTIAL filesystem outside its scope directories at once. OUT filesystems and the ones that
cannot hold an executable (``NO_EXECUTABLES``: proc, sysfs, ...) are never marked.

A filesystem is marked through one of its mounts in the agent's namespace: an O_PATH fd of
the mount point, checked to be that very mount (``mnt_id``: not a mount stacked over it),
then ``/proc/self/fd/N``. Every path lookup, which could wait on a stalled FUSE or network
mount on the way, happens in that open, never under the backend's lock, so the loop cannot
hang on it; at start every open comes before the first mark, so a start that hangs leaves
nothing waiting. The fd pins the mount for as long as it is open: a ``umount`` (without
``-l``) that races the watcher's first look at a new mount fails with EBUSY, so the watcher
holds each fd for one mark call only.

On a filesystem where a write through a shared mapping may leave the file's stamp as it
was (tmpfs and every type but ``fanotify_writes.STAMPED``), a second group, the write
guard, marks it with ``FAN_OPEN_PERM``: its own thread sees each write-open there before it
is answered (agent/sensors/fanotify_writes.py). Never in the exec group, and never on an
overlay: reading an event of an overlay file makes the kernel open that file for us, and
the overlay opens its layer's file with no "do not notify" flag (measured: 6.18), which
raises an open event of the layer's filesystem, answered by nobody while our read waits
for it. An exec in a container whose image layer sat on a guarded tmpfs froze the loop
until the watchdog killed the agent. The guard's group answers that open on its own
thread, and the guard's reads only ever open files of the filesystem that was marked.
The exec group is of the higher class (pre-content), so the kernel asks it first: an open
waiting for the guard holds none of the exec group's marks, and an exec waiting for the
exec group holds none of the guard's (the pinning below), whichever group is released
first at a kill.

Each mount of a marked filesystem in the agent's namespace carries a mount mark of the group
as well (the same mask, so no event is added): while an exec waits for an answer, the kernel
pins the current mark of every connector it walked (inode, mount, filesystem), whichever
group owns it. On a mount with only another group's mark (the pre-warm's close-after-write
watch, a group of this same process), that group's mark would be pinned; at a SIGKILL the
kernel releases the agent's groups last-opened-first, the other group's release waits for
the pin, the pin for the exec, the exec for this group, whose release never comes: the
watchdog's kill would leave the exec waiting for ever (measured: 6.18, an exec held 8
minutes). With this group's mark first on each such connector (a permission group sorts
before notification groups), only its own marks are pinned.

Where the kernel refuses a filesystem mark (an LSM that grants ``watch_mount`` but not
``watch_sb``, a kernel before 4.20) each of its mounts in the agent's namespace gets a
``FAN_MARK_MOUNT`` instead, and ``stats()`` says which filesystem and why: its files reached
through another mount or namespace are then not seen.

The kernel's own list of the group's marks (``fanotify_sys.group_marks``) is what each round
starts from, never a memory of what was added: a filesystem unmounted and another mounted with
the same device number between two rounds is marked again, and a mark the kernel dropped with
its filesystem is not counted.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Set

from agent.scope import FsClass, ScopeView
from agent.scope.classify import NO_EXECUTABLES
from agent.scope.live import mount_id_of_fd
from agent.scope.mountinfo import Mount
from agent.sensors import fanotify_sys as fs
from agent.sensors.fanotify_fuse import admin_access, user_of
from agent.sensors.fanotify_writes import (
    STACKED,
    guardable,
    ignore_marks_hold,
    stamps_follow_writes,
)

# errnos with which the kernel (or an LSM) refuses a mark of one kind: try the other kind
REFUSED = frozenset({errno.EINVAL, errno.EXDEV, errno.ENODEV, errno.EOPNOTSUPP, errno.EACCES,
                     errno.EPERM})
MAX_LISTED = 32  # filesystems named in stats(); the counts cover the rest


class GroupClosed(Exception):
    """The group was closed while marks were being placed (the backend stops)."""


# What proves that a verdict keyed by a file's stamp still covers its bytes.
STAMPED, GUARDED = "stamped", "guarded"


def mount_name(m: Mount) -> str:
    """How a filesystem is named in records and status: dev, type, mount point."""
    return f"{os.major(m.dev)}:{os.minor(m.dev)} {m.fstype} at {m.point}"


class FsMarks:
    """The marks of one fanotify group, kept equal to a ``ScopeView``.

    ``group`` returns the group fd, or -1 once it is closed; every mark call holds ``lock``
    (the backend's) so the fd cannot be closed and its number reused meanwhile. ``reconcile``
    runs on the mount watcher's thread; ``start`` on the caller's, before the loop exists.
    """

    def __init__(self, group: Callable[[], int], lock: threading.Lock,
                 guard: bool = False) -> None:
        self._group, self._lock = group, lock
        # the write guard's group (module docstring): FAN_OPEN_PERM on the guardable
        # filesystems in scope, never on an overlay
        self._guard = guard
        self._round = threading.Lock()  # one reconciliation at a time
        self.mask = 0  # the exec mask: FAN_OPEN_EXEC_PERM, or FAN_OPEN_PERM on old kernels
        # filesystems whose filesystem mark the kernel refused: dev -> why (mount marks)
        self._refused: Dict[int, str] = {}
        # wanted filesystems no mount of ours can reach (every one hidden): dev -> why
        self._unreachable: Dict[int, str] = {}
        self._names: Dict[int, str] = {}
        self._fstypes: Dict[int, str] = {}
        # filesystems marked as a whole whose every open reaches the loop (read by the
        # workers: a new frozenset per round, never changed in place)
        self.guarded: FrozenSet[int] = frozenset()
        self.n: Dict[str, int] = dict.fromkeys(
            ("mark_rounds", "filesystems_marked", "filesystems_unmarked", "mounts_marked",
             "mounts_unmarked", "mark_errors"), 0)
        self.last_error = ""
        self._wanted: List[int] = []  # the filesystems the last round wanted marked
        self._fuse: Dict[int, str] = {}  # fuse_in_scope()
        self._fuse_users: Dict[int, int] = {}  # FUSE dev -> its mounting user (user_id=)

    # -- public -------------------------------------------------------------------------
    def start(self, view: ScopeView, mounts: List[Mount], masks: Sequence[int]) -> int:
        """The first round: picks the first of ``masks`` the kernel accepts (EINVAL: this
        kernel lacks it) on the first filesystem, marks the rest. Raises OSError when not a
        single filesystem could be marked."""
        with self._round:
            wanted = _wanted(view, mounts)
            if not wanted:
                raise OSError(errno.ENOENT, "no filesystem in scope is mounted here")
            fds = _Fds(m for ms in wanted.values() for m in ms)
            try:
                first_error: Optional[OSError] = None
                for dev, ms in wanted.items():
                    try:
                        self.mask = self._first(dev, ms, fds, masks)
                        break
                    except OSError as exc:
                        first_error = first_error or exc
                if not self.mask:
                    raise first_error or OSError(errno.EINVAL, "no mount could be marked")
                self._apply(wanted, mounts, fds)
            finally:
                fds.close()
            return self.mask

    def start_guard(self, view: ScopeView, mounts: List[Mount]) -> None:
        """The write guard's first round: FAN_OPEN_PERM on every guardable filesystem in
        scope (none may be: nothing to do then). Raises OSError only for errors that are
        not a refusal; a refused filesystem is simply not guarded (write_proof)."""
        with self._round:
            self.mask = fs.FAN_OPEN_PERM
            wanted = self._wanted_of(view, mounts)
            fds = _Fds(m for ms in wanted.values() for m in ms)
            try:
                self._apply(wanted, mounts, fds)
            finally:
                fds.close()

    def reconcile(self, view: ScopeView, mounts: List[Mount]) -> None:
        """Add the marks a new view asks for and remove the ones it no longer does."""
        with self._round:
            if not self.mask:
                return
            wanted = self._wanted_of(view, mounts)
            kernel = self._kernel_marks()
            if kernel is None:
                return
            fds = _Fds(self._needed(wanted, mounts, kernel), lazy=True)
            try:
                self._apply(wanted, mounts, fds, kernel)
            except GroupClosed:
                return
            finally:
                fds.close()

    def fstype(self, dev: int) -> str:
        return self._fstypes.get(dev, "")

    def fuse_in_scope(self) -> Dict[int, str]:
        """The FUSE filesystems (fuse, fuse.*, fuseblk) marked or about to be: dev -> name.
        Noted before the mark call (a mark may itself wait for the daemon) and kept after an
        unmount (the kernel keeps a mark while anything holds the filesystem) until
        ``forget_fuse``. Memory only, no lock (agent/sensors/fanotify_fuse.py reads it from
        its own thread while the loop may be stuck)."""
        return dict(self._fuse)

    def forget_fuse(self, dev: int) -> None:
        """Its FUSE connection is gone (its mounting user goes with it)."""
        self._fuse.pop(dev, None)
        self._fuse_users.pop(dev, None)

    def any_user_fuse(self) -> bool:
        """A FUSE filesystem mounted by a user other than root is (or was) marked."""
        return any(self._fuse_users.values())

    def fuse_user(self, dev: int) -> Optional[int]:
        """The mounting user of FUSE filesystem ``dev`` (None: not FUSE, or no user_id)."""
        return self._fuse_users.get(dev)

    def _note_fuse(self, dev: int, m: Mount) -> None:
        if m.fstype.startswith("fuse"):
            self._fuse[dev] = mount_name(m)
            user = user_of(m.super_options)
            if user is not None:
                self._fuse_users[dev] = user

    def write_proof(self, dev: int) -> Optional[str]:
        """What shows that a stamp-keyed verdict for a file of filesystem ``dev`` (its
        mount's device) still covers the bytes: STAMPED (every write changes the stamp),
        GUARDED (every write-open reaches the loop first), or None (nothing: never keep
        one)."""
        if stamps_follow_writes(self._fstypes.get(dev, "")):
            return STAMPED
        return GUARDED if dev in self.guarded else None

    def ignorable(self, dev: int) -> bool:
        """An allowed file of filesystem ``dev`` may carry an ignore mark: every write-open
        there removes it first (fanotify_writes.py)."""
        return dev in self.guarded and ignore_marks_hold(self._fstypes.get(dev, ""))

    def stats(self) -> Dict[str, Any]:
        """Counters, and the marks as the kernel lists them now: filesystems marked as a
        whole, mounts marked one by one, inode marks (none: no ignore marks)."""
        out: Dict[str, Any] = dict(self.n)
        kernel = self._kernel_marks()
        if kernel is not None:
            wanted = self._wanted
            out.update(
                marked_filesystems=len(kernel.filesystems), marked_mounts=len(kernel.mounts),
                marked_inodes=kernel.inodes, write_guarded_filesystems=len(self.guarded),
                marked=[self._names.get(d, str(d)) for d in wanted
                        if d in kernel.filesystems][:MAX_LISTED],
                in_scope_unmarked=len([d for d in wanted if d not in kernel.filesystems
                                       and d not in self._refused]))
        out["mark_fallbacks"] = dict(list(self._named(self._refused).items())[:MAX_LISTED])
        out["unmarkable"] = dict(list(self._named(self._unreachable).items())[:MAX_LISTED])
        out["mark_last_error"] = self.last_error
        return out

    # -- one round ----------------------------------------------------------------------
    def _want(self, dev: int) -> int:
        """The mask of a filesystem mark: the exec mask (FAN_OPEN_PERM on old kernels,
        which then shows every open), or the guard's FAN_OPEN_PERM."""
        return self.mask

    def _wanted_of(self, view: ScopeView, mounts: List[Mount]) -> Dict[int, List[Mount]]:
        wanted = _wanted(view, mounts)
        if not self._guard:
            return wanted
        return {d: ms for d, ms in wanted.items() if guardable(ms[0].fstype)
                and ms[0].fstype not in STACKED}

    def _first(self, dev: int, ms: List[Mount], fds: _Fds, masks: Sequence[int]) -> int:
        """Mark one filesystem with the first mask the kernel takes (EINVAL for both mark
        kinds: this kernel lacks the mask, try the next); that mask. The round that follows
        adds the rest of the filesystem's mask."""
        fd = next((f for f in (fds.get(m) for m in ms) if f is not None), None)
        if fd is None:
            raise OSError(errno.ENOENT, f"no mount of {mount_name(ms[0])} could be opened")
        self._note_fuse(dev, ms[0])
        last: Optional[OSError] = None
        for mask in masks:
            try:
                self._call(fs.FAN_MARK_ADD | fs.FAN_MARK_FILESYSTEM, fd, mask, ms[0].fstype)
                self.n["filesystems_marked"] += 1
                return mask
            except OSError as exc:
                if exc.errno not in REFUSED:
                    raise
                why = _refusal(exc)
            try:
                self._call(fs.FAN_MARK_ADD | fs.FAN_MARK_MOUNT, fd, mask, ms[0].fstype)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                last = exc
                continue
            self.n["mounts_marked"] += 1
            self._refused[dev] = why  # the other mounts of it: in the round that follows
            return mask
        raise last or OSError(errno.EINVAL, "no permission event mask was accepted")

    def _missing(self, dev: int, kernel: fs.GroupMarks) -> bool:
        """The filesystem lacks its mark, or a bit of its mask."""
        want = self._want(dev)
        return kernel.filesystems.get(dev, 0) & want != want

    def _unmounted(self, dev: int, ms: List[Mount], kernel: fs.GroupMarks) -> List[Mount]:
        """Mounts of ``dev`` whose mount mark is missing, or a bit of its mask."""
        want = self.mask if dev in self._refused else self._want(dev)
        return [m for m in ms if kernel.mounts.get(m.mount_id, 0) & want != want]

    def _needed(self, wanted: Dict[int, List[Mount]], mounts: List[Mount],
                kernel: fs.GroupMarks) -> List[Mount]:
        """The mounts this round must open: for filesystems to mark or unmark, and for
        mounts to mark or unmark (filesystems marked mount by mount)."""
        for dev, ms in wanted.items():
            self._fstypes[dev] = ms[0].fstype
        need: List[Mount] = []
        for dev, ms in wanted.items():
            if dev not in self._refused and self._missing(dev, kernel):
                need += ms
            else:
                need += self._unmounted(dev, ms, kernel)
        for m in mounts:
            if m.dev in wanted:
                continue
            if m.dev in kernel.filesystems or m.mount_id in kernel.mounts:
                need.append(m)
        return need

    def _apply(self, wanted: Dict[int, List[Mount]], mounts: List[Mount],
               fds: _Fds, kernel: Optional[fs.GroupMarks] = None) -> None:
        for dev, ms in wanted.items():
            self._fstypes[dev] = ms[0].fstype
            self._names[dev] = mount_name(ms[0])
            self._note_fuse(dev, ms[0])
        if kernel is None:
            kernel = self._kernel_marks() or fs.GroupMarks({}, {})
        present = {m.dev for m in mounts}
        for dev in list(self._refused):  # gone from the table: a new one gets a new try
            if dev not in present:
                del self._refused[dev]
        self._unreachable = {d: why for d, why in self._unreachable.items() if d in wanted}
        for dev, ms in wanted.items():
            if dev not in self._refused and self._missing(dev, kernel):
                self._mark_filesystem(dev, ms, fds)
            # every mount of it too: refused filesystems are marked this way alone, the
            # others so that no other group's mark is the one pinned (module docstring)
            want = self.mask if dev in self._refused else self._want(dev)
            self._mark_mounts(self._unmounted(dev, ms, kernel), fds, want)
        self._unmark(wanted, mounts, fds, kernel)
        self.n["mark_rounds"] += 1
        self._wanted = list(wanted)
        after = self._kernel_marks()
        if after is not None:
            self.guarded = frozenset(
                d for d, mask in after.filesystems.items()
                if d in wanted and mask & fs.FAN_OPEN_PERM
                and guardable(self._fstypes.get(d, "")))
        self._fstypes = {d: t for d, t in self._fstypes.items() if d in present}

    def _mark_filesystem(self, dev: int, ms: List[Mount], fds: _Fds) -> bool:
        """FAN_MARK_FILESYSTEM through the first mount of ``dev`` that was reached; mount
        marks where the kernel refuses it. False when no mount of it was reached."""
        for m in ms:
            fd = fds.get(m)
            if fd is None:
                continue
            try:
                self._call(fs.FAN_MARK_ADD | fs.FAN_MARK_FILESYSTEM, fd, self._want(dev),
                           m.fstype)
            except OSError as exc:
                if exc.errno not in REFUSED:  # ENOMEM and the like: the next round retries
                    self._failed(f"filesystem mark on {mount_name(m)}", exc)
                    return False
                self._refused[dev] = _refusal(exc)  # the caller marks its mounts
                return True
            self._unreachable.pop(dev, None)
            self.n["filesystems_marked"] += 1
            return True
        self._unreachable[dev] = "no mount of it in the agent's namespace could be opened " \
                                 "(each one hidden under another mount, or gone)"
        return False

    def _mark_mounts(self, ms: Iterable[Mount], fds: _Fds, mask: int) -> None:
        """Mount marks with ``mask``. A filesystem whose filesystem mark was refused gets
        the exec mask alone: a write-open through another mount would go unseen, so it is
        never GUARDED (write_proof)."""
        for m in ms:
            fd = fds.get(m)
            if fd is None:
                continue
            try:
                self._call(fs.FAN_MARK_ADD | fs.FAN_MARK_MOUNT, fd, mask, m.fstype)
                self.n["mounts_marked"] += 1
            except OSError as exc:
                self._failed(f"mount mark on {mount_name(m)}", exc)
            finally:
                fds.release(m)

    def _unmark(self, wanted: Dict[int, List[Mount]], mounts: List[Mount],
                fds: _Fds, kernel: fs.GroupMarks) -> None:
        """Marks the view no longer asks for: a PARTIAL filesystem that became OUT (the
        mount that put part of it inside a scope is gone) must not keep every exec on it
        waiting for the agent. A filesystem no mount of ours reaches keeps its mark (its
        files are then in scope: placed through no mount of ours)."""
        done: Set[int] = set()
        for m in mounts:
            if m.dev in wanted or not ((m.dev in kernel.filesystems and m.dev not in done)
                                       or m.mount_id in kernel.mounts):
                continue
            fd = fds.get(m)
            if fd is None:
                continue
            try:
                if m.dev in kernel.filesystems and m.dev not in done:
                    self._call(fs.FAN_MARK_REMOVE | fs.FAN_MARK_FILESYSTEM, fd,
                               kernel.filesystems[m.dev])
                    self.n["filesystems_unmarked"] += 1
                    done.add(m.dev)
                if m.mount_id in kernel.mounts:
                    self._call(fs.FAN_MARK_REMOVE | fs.FAN_MARK_MOUNT, fd,
                               kernel.mounts[m.mount_id])
                    self.n["mounts_unmarked"] += 1
            except OSError as exc:
                self._failed(f"removing the mark of {mount_name(m)}", exc)
            finally:
                fds.release(m)

    # -- helpers ------------------------------------------------------------------------
    def _call(self, flags: int, fd: int, mask: Optional[int] = None, fstype: str = "") -> None:
        with self._lock:
            group = self._group()
            if group < 0:
                raise GroupClosed()
            want = self.mask if mask is None else mask
            try:
                fs.mark_through_fd(group, flags, want, fd)
            except PermissionError:
                # a user's FUSE mount refuses root unless fuse lets it in for the mark
                # (agent/sensors/fanotify_fuse.admin_access); without that it stays
                # unmarked, in mark_fallbacks and mark_last_error
                if not fstype.startswith("fuse"):
                    raise
                try:
                    with admin_access():
                        fs.mark_through_fd(group, flags, want, fd)
                except OSError as exc:  # EACCES whatever failed: a refusal (mark_fallbacks)
                    raise PermissionError(errno.EACCES,
                                          f"{exc} (with fuse allow_sys_admin_access)") from exc

    def _kernel_marks(self) -> Optional[fs.GroupMarks]:
        with self._lock:
            group = self._group()
            if group < 0:
                return None
            try:
                return fs.group_marks(group)
            except OSError as exc:
                self._failed("reading the group's marks", exc)
                return None

    def _failed(self, what: str, exc: OSError) -> None:
        self.n["mark_errors"] += 1
        self.last_error = f"{what}: {exc}"

    def _named(self, by_dev: Dict[int, str]) -> Dict[str, str]:
        return {self._names.get(d, f"{os.major(d)}:{os.minor(d)}"): why
                for d, why in by_dev.items()}


def _wanted(view: ScopeView, mounts: List[Mount]) -> Dict[int, List[Mount]]:
    """IN and PARTIAL filesystems with their mounts in the agent's namespace, in table
    order (the first mount listed is tried first)."""
    out: Dict[int, List[Mount]] = {}
    for m in mounts:
        if m.fstype in NO_EXECUTABLES or view.class_of(m.dev) is FsClass.OUT:
            continue
        out.setdefault(m.dev, []).append(m)
    return out


class _Fds:
    """O_PATH fds of mount roots for one round. Eager (start): every mount of ``ms`` opened
    now, before any mark, all closed at the end. Lazy (the watcher): each opened when it is
    needed and closed right after its mark call (``release``)."""

    def __init__(self, ms: Iterable[Mount], lazy: bool = False) -> None:
        self._lazy = lazy
        self._fds: Dict[int, Optional[int]] = {}
        if not lazy:
            for m in ms:
                if m.mount_id not in self._fds:
                    self._fds[m.mount_id] = _open_mount(m)

    def get(self, m: Mount) -> Optional[int]:
        if self._lazy and m.mount_id not in self._fds:
            self._fds[m.mount_id] = _open_mount(m)
        return self._fds.get(m.mount_id)

    def release(self, m: Mount) -> None:
        if self._lazy:
            fd = self._fds.pop(m.mount_id, None)
            if fd is not None:
                os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()


def _open_mount(m: Mount) -> Optional[int]:
    """An O_PATH fd of that very mount's root, or None (a mount point may show another mount
    stacked over it, or be gone)."""
    try:
        fd = os.open(m.point, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    if mount_id_of_fd(fd) == m.mount_id:
        return fd
    os.close(fd)
    return None


def _refusal(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"filesystem mark refused ({code}: {os.strerror(exc.errno or 0)}); marked mount " \
           "by mount, so its files reached through another mount or namespace are not seen"
