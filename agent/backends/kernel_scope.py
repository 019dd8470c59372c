"""The scope in the kernel maps of the BPF backends, kept current as mounts come and go.

``KernelScope`` owns a ``ScopeTracker`` and a ``MountWatcher`` (agent/scope) and writes what
they find into a sensor: the class of every filesystem the agent sees, the scope roots inside
PARTIAL filesystems, the dynamic loaders, and the guards the policy's ``boundary`` asks for.
A filesystem that appears after the start is written as *dynamic* (its files are never given
the benefit of the doubt at a mapping); one that disappears is dropped, so its device number,
if reused, is unseen (in scope) again, and its verdicts go with it.
"""

from __future__ import annotations

import glob
import os
import stat
import threading
from typing import Any, Callable, Dict, FrozenSet, Optional, Set, Tuple

from agent.decision import FileIdentity
from agent.policy import PolicySnapshot
from agent.scope import FsClass, MountWatcher, ScopeTracker, ScopeView
from agent.scope.mountinfo import Mount
from agent.sensors.bpf_lsm import Guards
from agent.sensors.fanotify_fuse import FuseBreaker, limit_for, say_cut
from agent.sensors.fanotify_marks import mount_name

# Where distributions keep their dynamic loaders (glibc, musl); each inode counts once.
LOADER_GLOBS = ("/lib64/ld-linux*.so*", "/lib/ld-linux*.so*", "/lib/*/ld-linux*.so*",
                "/usr/lib/ld-linux*.so*", "/usr/lib64/ld-linux*.so*",
                "/usr/lib/*/ld-linux*.so*", "/lib/ld-musl-*.so*", "/usr/lib/ld-musl-*.so*",
                "/lib64/ld64.so*", "/lib/ld64.so*", "/lib/ld.so*", "/usr/lib/ld.so*")


def find_loaders(key_of: Callable[[int], Optional[Tuple[int, int]]]
                 ) -> FrozenSet[Tuple[int, int]]:
    """(dev, ino) of every dynamic loader on this host (symlinks followed), as the kernel's
    hooks see them (``key_of``: agent/scope ScopeTracker.kernel_key)."""
    out: Set[Tuple[int, int]] = set()
    for pattern in LOADER_GLOBS:
        for path in glob.glob(pattern):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    key = key_of(fd)
                    if key is not None:
                        out.add(key)
            finally:
                os.close(fd)
    return frozenset(out)


def guards_for(snapshot: PolicySnapshot, view: ScopeView, scanned: bool = False) -> Guards:
    """The kernel switches for this policy. Mounts are guarded only while the scopes leave
    part of the host out: with everything in scope no mount can bring an outside file in.
    ``scanned``: the pre-scan has verified the whole scope under this policy, so a file
    mapped without a verdict gets no benefit of the doubt."""
    b = snapshot.boundary
    return Guards(loader=not b.loader_exec, maps=b.judge_mappings,
                  paths=snapshot.path_dependent, mounts=view.partial and not b.mounts,
                  ptrace=not b.ptrace, unseen_out=not b.unseen_in_scope,
                  strict_maps=scanned and b.judge_mappings)


class KernelScope:
    """Keeps one sensor's scope maps equal to the agent's view of the mounts."""

    def __init__(self, sensor: Any, snapshot: PolicySnapshot) -> None:
        self._sensor = sensor
        self._lock = threading.Lock()
        self._tracker = ScopeTracker(snapshot.scope_roots())
        self._snapshot = snapshot
        self._watcher: Optional[MountWatcher] = None
        self._started = False
        self._scanned: Optional[PolicySnapshot] = None  # the pre-scan is complete under it
        self.n: Dict[str, int] = dict.fromkeys(
            ("refreshes", "filesystems_added", "filesystems_dropped", "verdicts_purged",
             "errors"), 0)
        self.loaders: FrozenSet[Tuple[int, int]] = frozenset()
        # FUSE filesystems in scope: dev -> name, kept after an unmount (a file of it may
        # still be open, and waited on) until the breaker sees its connection gone
        self._fuse: Dict[int, str] = {}
        self._by_dev: Dict[int, Mount] = {}  # dev -> a mount of it, of the last table read
        self._breaker: Optional[FuseBreaker] = None

    @property
    def view(self) -> ScopeView:
        return self._tracker.view

    @property
    def tracker(self) -> ScopeTracker:
        return self._tracker

    def start(self) -> None:
        """Write the whole view (nothing dynamic yet), then follow mount changes."""
        self.apply()
        self.loaders = find_loaders(self.kernel_key)
        self._sensor.set_loaders(self.loaders)
        self._started = True
        self._watcher = MountWatcher(self._on_mounts)
        self._watcher.start()

    def start_fuse_breaker(self, deadline_s: float) -> None:
        """The runner's poll thread opens and reads the files it verifies; on a FUSE
        filesystem each is a request to the filesystem's daemon, and one that never answers
        would hold the thread (past any SIGKILL: fs/fuse/dev.c) until the service watchdog
        gave up on the agent, and every new signed file in scope would stay unverified. The
        breaker aborts such a filesystem's connection first (agent/sensors/fanotify_fuse.py,
        the rules fanotify-exec uses). Only an agent thread waiting inside FUSE without
        running counts (the poll thread verifies inline, so its silence alone may be a long
        hash, not a stalled filesystem)."""
        self._breaker = FuseBreaker(limit_for(deadline_s), self.fuse_in_scope, lambda: 0.0,
                                    lambda: (), on_cut=say_cut, forget=self.forget_fuse)
        self._breaker.start()

    def watch(self, dev: int) -> None:
        """The agent is about to open a file of filesystem ``dev`` (a record's): a FUSE
        filesystem goes on the breaker's list first, also when the agent's mount table
        does not show it (another mount namespace: /proc/PID/exe, map_files) or shows it
        out of scope (a script's interpreter input). FUSE filesystems have anonymous device
        numbers (major 0) or, fuseblk, a block device's, which the mount table names."""
        if self._breaker is None or dev in self._fuse:
            return
        m = self._by_dev.get(dev)
        if m is not None:  # in the table (a FUSE one in scope is on the list already)
            if m.fstype.startswith("fuse"):
                self._fuse[dev] = mount_name(m)
            return
        if os.major(dev) == 0 and self._breaker.is_connection(dev):
            self._fuse[dev] = f"{os.major(dev)}:{os.minor(dev)} fuse (not in the agent's " \
                              "mount table)"

    def fuse_in_scope(self) -> Dict[int, str]:
        """dev -> name of the FUSE filesystems in scope, seen since they went (memory only,
        no lock: the breaker reads it while other threads may be stuck)."""
        return dict(self._fuse)

    def forget_fuse(self, dev: int) -> None:
        self._fuse.pop(dev, None)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        if self._breaker is not None:
            self._breaker.stop()

    def alive(self) -> Optional[str]:
        if self._watcher is not None and not self._watcher.alive():
            return "mount watcher thread not running"
        return None

    def kernel_key(self, fd: int) -> Optional[Tuple[int, int]]:
        """(dev, ino) of an open file as the kernel's hooks see it; stat() where this kernel
        cannot say (fdinfo without ``ino``, before 5.14)."""
        key = self._tracker.kernel_key(fd)
        if key is None:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
        return key

    def identity(self, fd: int) -> FileIdentity:
        """The identity to key a kernel verdict with: the kernel's (dev, ino), and the stamp
        from fstat (an overlay inode copies its layer's ctime, mtime and size)."""
        st = os.fstat(fd)
        dev, ino = self.kernel_key(fd) or (st.st_dev, st.st_ino)
        return FileIdentity(dev, ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns)

    def policy_changed(self, snapshot: PolicySnapshot) -> None:
        """New scope roots (a new tracker) and new guards; the verdicts are gone, so the
        scope counts as unscanned until the pre-scan has run again under this policy."""
        with self._lock:
            self._snapshot = snapshot
            self._tracker = ScopeTracker(snapshot.scope_roots())
        self.apply()

    def prescan_done(self, snapshot: PolicySnapshot, complete: bool) -> None:
        """The pre-scan finished under ``snapshot``; ``complete``: it saw every file in scope
        (no file limit reached). Mappings of files without a verdict are denied from now on,
        unless the policy changed meanwhile."""
        with self._lock:
            if snapshot is not self._snapshot or not complete:
                return
            self._scanned = snapshot
        self.apply()

    def guards(self) -> Guards:
        return guards_for(self._snapshot, self.view, self._scanned is self._snapshot)

    def covers(self, dev: int) -> bool:
        """The kernel judges files of this filesystem (some or all of them)."""
        return self.view.class_of(dev) is not FsClass.OUT

    def _on_mounts(self) -> None:
        try:
            self.apply()
        except Exception:
            self.n["errors"] += 1
            raise

    def apply(self) -> None:
        """Reread the mount table and bring the sensor's maps to it."""
        with self._lock:
            _old, new = self._tracker.refresh()
            self.n["refreshes"] += 1
            sensor = self._sensor
            have: Dict[int, int] = sensor.fs_classes
            for dev, cls in new.classes.items():
                known = dev in have
                dynamic = self._started and (not known or bool(have[dev] & 0x100))
                value = int(cls) | (0x100 if dynamic else 0)
                if have.get(dev) != value:
                    sensor.set_fs_class(dev, cls, dynamic=dynamic)
                    self.n["filesystems_added"] += int(not known)
            for dev in set(have) - set(new.classes):
                sensor.drop_fs_class(dev)
                self.n["filesystems_dropped"] += 1
                self.n["verdicts_purged"] += int(sensor.clear_verdicts(dev))
            sensor.set_scope_dirs(self._tracker.kernel_dirs)
            mounts = self._tracker.mounts()
            self._by_dev = {m.dev: m for m in mounts}
            for m in mounts:
                if m.fstype.startswith("fuse") and new.class_of(m.dev) is not FsClass.OUT:
                    self._fuse[m.dev] = mount_name(m)
            enforce, deny_unknown = sensor.mode
            sensor.set_mode(enforce=enforce, deny_unknown=deny_unknown,
                            guards=guards_for(self._snapshot, new,
                                              self._scanned is self._snapshot))

    def stats(self) -> Dict[str, Any]:
        view = self.view
        counts: Dict[str, int] = {}
        for cls in view.classes.values():
            counts[cls.name.lower()] = counts.get(cls.name.lower(), 0) + 1
        out: Dict[str, Any] = dict(self.n)
        out.update(filesystems=counts, scope_dirs=len(self._tracker.kernel_dirs),
                   partial=view.partial, loaders=len(self.loaders),
                   guards=self.guards().__dict__, notes=list(view.notes))
        if self._breaker is not None:
            out.update(self._breaker.stats())
        return out

