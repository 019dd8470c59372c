"""The file a kill or audit-only script record names, opened as the caller saw it.

At ``sched_process_exec`` the kernel has the interpreter, not the script, whose file is
closed by then; the record carries the name the caller gave execve (exec_sensor.c,
EG_MSG_SCRIPT). That name is resolved here in the caller's own view. What it cannot give:
a file renamed, removed or swapped at that name before the agent looks (the record's
identity says which file was judged), a name cut at the record's 255 bytes, and a working
directory the caller left (a relative name is resolved from its cwd of the moment).
docs/sensors.md, "Scripts, judged late".
"""

from __future__ import annotations

import ctypes
import os
import re
import stat
import struct
from typing import List, Optional, Tuple

from agent.decision import ExecEvent

PATH_CUT = 255  # bytes of a record's path before its NUL (events.h EG_PATH_LEN - 1)
# A descriptor named through the caller's own /proc view (execveat(fd, "", AT_EMPTY_PATH)
# gives "/dev/fd/N"): "self" would be the agent, so these go to /proc/PID/fd/N.
_OWN_FD = re.compile(r"^/(?:dev/fd|proc/self/fd|proc/thread-self/fd)/(\d+)$")
_SYS_OPENAT2 = 437  # x86_64, aarch64 and most others (5.6+)
_RESOLVE_IN_ROOT = 0x10
_libc: Optional[ctypes.CDLL] = None


def _openat2_in_root(root_fd: int, path: str, flags: int) -> int:
    """openat2(RESOLVE_IN_ROOT): ``path`` and every symlink on the way resolved with
    ``root_fd`` as "/" (a container's absolute symlink stays in the container). Raises
    OSError."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    how = struct.pack("QQQ", flags, 0, _RESOLVE_IN_ROOT)
    fd = _libc.syscall(_SYS_OPENAT2, root_fd, os.fsencode(path), how, len(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def open_script(event: ExecEvent) -> Optional[int]:
    """The file a script record names (``event.path``, as the caller passed it to execve),
    open, or None. Resolved in the caller's own view while it lives: an absolute name
    inside its root (openat2 RESOLVE_IN_ROOT: a chroot's or container's symlinks cannot
    lead out), a relative one from its working directory, a descriptor name from its fd
    table; else an absolute name from ours. Only a regular file is opened for reading
    (first as O_PATH: no device's open runs and no terminal becomes the agent's)."""
    path = event.path
    if not path:
        return None
    own = _OWN_FD.match(path)
    tries: List[Tuple[Optional[str], str]] = []
    if own:
        tries.append((None, f"/proc/{event.pid}/fd/{own.group(1)}"))
    elif path.startswith("/"):
        tries += [(f"/proc/{event.pid}/root", path), (None, path)]
    else:
        tries.append((None, f"/proc/{event.pid}/cwd/{path}"))
    for root, name in tries:
        try:
            if root is None:
                handle = os.open(name, os.O_PATH | os.O_CLOEXEC)
            else:
                root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    handle = _openat2_in_root(root_fd, path, os.O_PATH | os.O_CLOEXEC)
                finally:
                    os.close(root_fd)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(handle).st_mode):
                return None
            return os.open(f"/proc/self/fd/{handle}",
                           os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        finally:
            os.close(handle)
    return None
