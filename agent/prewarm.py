"""Verify before the first exec: scan the scopes at start, and re-verify files closed after
writing. The first exec of a signed binary deployed while the agent runs is then a cache hit.

Both paths run on low-priority background threads and only fill the verdict cache (and,
through ``on_result``, a backend's kernel verdict map); exec-time decisions stay the
decider's. Notification events never block anything, unlike permission events.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

from agent.cache import identity_from_stat
from agent.decide import Decider
from agent.decision import FileIdentity
from agent.digest import Artifact
from agent.errors import ExecguardError
from agent.policy import Mode, PolicySnapshot, decide, subject_of
from agent.sensors import fanotify_sys as fs
from agent.sensors.fanotify_scope import PSEUDO_FS, mounts

FAN_CLOSE_WRITE = 0x00000008
FAN_CLASS_NOTIF = 0x00000000
ELF_MAGIC = b"\x7fELF"
SIGNATURE_SUFFIXES = (".sig", ".sigstore.json", ".bundle")

# (path, identity, allow, the policy it was decided under)
OnResult = Callable[[str, FileIdentity, bool, PolicySnapshot], None]


@dataclass
class PrewarmStats:
    scanned: int = 0
    verified: int = 0
    skipped: int = 0
    errors: int = 0
    close_write_events: int = 0
    scan_done: bool = False
    scan_complete: bool = False  # the scan saw every file (no file limit reached)

    def to_json(self) -> dict:  # type: ignore[type-arg]
        return dict(self.__dict__)


def signed_file(path: str) -> Optional[str]:
    """The file a signature beside it covers (``x.sig`` → ``x``), or None."""
    for suffix in SIGNATURE_SUFFIXES:
        if path.endswith(suffix) and len(path) > len(suffix):
            return path[: -len(suffix)]
    return None


def pseudo_mounts() -> List[str]:
    """Mount points of kernel pseudo filesystems: never walked."""
    try:
        return [point for point, fstype in mounts() if fstype in PSEUDO_FS]
    except OSError:
        return []


def walk_elf_candidates(roots: Sequence[str], skip: Sequence[str], limit: int
                        ) -> Iterator[str]:
    """Regular files under ``roots`` (not following symlinks), pseudo filesystems skipped."""
    skipped = tuple(s.rstrip("/") + "/" for s in skip if s != "/")
    seen = 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            if (dirpath.rstrip("/") + "/").startswith(skipped):
                dirnames[:] = []
                continue
            dirnames[:] = [d for d in dirnames
                           if not (os.path.join(dirpath, d) + "/").startswith(skipped)]
            for name in filenames:
                if seen >= limit:
                    return
                seen += 1
                yield os.path.join(dirpath, name)


class Prewarmer:
    """Fills the verdict cache ahead of execs; ``on_result(path, identity, allow, snapshot)``
    with the policy snapshot the verdict was decided under."""

    def __init__(self, decider: Decider, on_result: Optional[OnResult] = None,
                 max_files: int = 20000, skip: Sequence[str] = (),
                 on_scan_done: Optional[Callable[[PolicySnapshot, bool], None]] = None
                 ) -> None:
        self.decider = decider
        self.on_result = on_result
        self.on_scan_done = on_scan_done  # (policy scanned under, every file seen)
        self.max_files = max_files
        self.skip = list(skip) + pseudo_mounts()
        self.stats = PrewarmStats()
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._group = -1

    def warm_fd(self, path: str, fd: int, fresh: bool = False) -> Optional[bool]:
        """Decide ``path`` (open as ``fd``) as an exec by its owner would be; None if skipped.
        ``fresh`` (a close-after-write): trust no cache keyed by the file's identity, since
        a write through a shared mapping can change the bytes and keep the stamp."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < 64 or os.pread(fd, 4, 0) != ELF_MAGIC:
            self.stats.skipped += 1
            return None
        snapshot = self.decider.store.current.snapshot
        if not snapshot.in_scope(path) or st.st_size > snapshot.limits.max_file_bytes:
            self.stats.skipped += 1
            return None
        artifact = Artifact(path, fd, st.st_size, st.st_dev, st.st_ino, st.st_ctime_ns,
                            st.st_mtime_ns)
        # a denial is not cached here: the binary is often deployed before its signature
        outcome = decide(snapshot, subject_of(artifact, st.st_uid, path, st.st_gid,
                                              fresh=fresh),
                         lambda trust: self.decider.verify_into_cache(
                             artifact, trust, snapshot, cache_negative=False,
                             use_cache=not fresh)[0])
        self.stats.verified += 1
        # a monitor rule's denial in an enforce policy does not block: let the kernel
        # verdict maps allow it too
        runs = outcome.allow or (outcome.mode is Mode.MONITOR and snapshot.mode is Mode.ENFORCE)
        # A denial goes to the kernel maps too, for mappings (which no fill decides at the
        # moment they happen), but only where no verdict is yet: decided at the binary's
        # close-write, before its signature was written, it must never land over the allow
        # the exec's own fill wrote meanwhile (the runner inserts it, never overwrites).
        if self.on_result is not None:
            # the snapshot goes along: a policy swap during this (slow) decision must not
            # let the old policy's verdict into the map the swap has just emptied
            self.on_result(path, identity_from_stat(st), runs, snapshot)
        return outcome.allow

    def signature_changed(self, binary: str) -> None:
        """A signature beside ``binary`` was written: forget its verdict and verify again."""
        try:
            self.decider.cache.discard(identity_from_stat(os.stat(binary)))
        except OSError:
            return  # the signature came first; the binary's own close-write warms it
        self.warm_path(binary)

    def warm_path(self, path: str) -> Optional[bool]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_NOCTTY)
        except OSError:
            self.stats.errors += 1
            return None
        try:
            return self.warm_fd(path, fd)
        except (OSError, ExecguardError):
            self.stats.errors += 1
            return None
        finally:
            os.close(fd)

    def scan(self, roots: Sequence[str]) -> None:
        _lower_priority()
        snapshot = self.decider.store.current.snapshot
        seen = 0
        for path in walk_elf_candidates(roots, self.skip, self.max_files):
            if self._stop.is_set():
                return
            seen += 1
            self.stats.scanned += 1
            self.warm_path(path)
        self.stats.scan_complete = seen < self.max_files
        self.stats.scan_done = True
        if self.on_scan_done is not None:
            self.on_scan_done(snapshot, self.stats.scan_complete)

    def rescan(self, roots: Sequence[str]) -> None:
        """Scan again (a new policy: the kernel maps were emptied)."""
        self.stats.scan_done = self.stats.scan_complete = False
        self._spawn(lambda: self.scan(roots), "prewarm-rescan")

    def start(self, roots: Sequence[str], watch: bool = True) -> None:
        """Scan ``roots`` in the background and, with ``watch``, follow close-after-write."""
        if watch:
            self._group = fs.fanotify_init(FAN_CLASS_NOTIF | fs.FAN_CLOEXEC | fs.FAN_NONBLOCK,
                                           fs.EVENT_F_FLAGS)
            for root in roots:
                fs.fanotify_mark(self._group, fs.FAN_MARK_ADD | fs.FAN_MARK_MOUNT,
                                 FAN_CLOSE_WRITE, fs.AT_FDCWD, root)
            self._spawn(self._watch, "prewarm-watch")
        self._spawn(lambda: self.scan(roots), "prewarm-scan")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _watch(self) -> None:
        _lower_priority()
        for events, problem in fs.notification_batches(self._group, self._stop):
            if problem:  # a read failed (EMFILE...): that close-write is lost, not the watch
                self.stats.errors += 1
            for ev in events:
                if ev.fd < 0:
                    continue
                try:
                    self.stats.close_write_events += 1
                    path = os.readlink(f"/proc/self/fd/{ev.fd}")
                    binary = signed_file(path)
                    if binary is None:
                        self.warm_fd(path, ev.fd, fresh=True)
                    else:
                        self.signature_changed(binary)
                except (OSError, ExecguardError):
                    self.stats.errors += 1
                finally:
                    os.close(ev.fd)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._group >= 0:
            os.close(self._group)
            self._group = -1


def _lower_priority() -> None:
    """Background work yields the CPU to exec-time decisions (nice is per thread on Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
