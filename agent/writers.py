"""Does a file have writers right now? The rule every verdict publication follows.

A verdict (a kernel map entry, a fanotify ignore mark, a trusted-cache entry) stands for the
bytes that were hashed. Writes through a writable shared mapping whose page is already
writable change those bytes without changing ctime, mtime or size, and without the
FS_MODIFY event that would clear an ignore mark (measured on tmpfs, 6.18: only the first
write fault of a mapping updates the times). So a verdict is published only when nobody
holds the file open for writing (a writable shared mapping keeps its file open for write):
checked before the bytes are hashed, and again right after the verdict is published, so a
writer that opens in between is seen by one of the two checks or by the kernel's own
invalidation of the verdict at its open.

The check takes a read lease (F_SETLEASE F_RDLCK), which the kernel refuses with EAGAIN
while the inode is open for write, and drops it at once. A lease makes the kernel send the
holder SIGIO when someone opens the file for write; the agent ignores SIGIO
(``ignore_lease_signals``), and the lease is held for two system calls only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import signal
import threading

_lock = threading.Lock()
_signals_ignored = False


def ignore_lease_signals() -> None:
    """SIGIO's default action ends the process: a lease break must never do that. Call it
    from the main thread before the first check (``has_writers`` does it when it can)."""
    global _signals_ignored
    with _lock:
        if _signals_ignored:
            return
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGIO, signal.SIG_IGN)
            _signals_ignored = True


def has_writers(fd: int) -> bool:
    """True when the file ``fd`` refers to is open for writing anywhere (or may be: a file
    system that refuses leases, a lease we are not allowed to take). Never raises."""
    if not _signals_ignored:
        ignore_lease_signals()
        if not _signals_ignored:
            return True  # off the main thread before any call from it: cannot check safely
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            return True  # open for write (or a conflicting lease)
        return True  # EINVAL (no lease support), EACCES, EBADF: cannot prove there are none
    with contextlib.suppress(OSError):  # the lease goes with the fd at close at the latest
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False
