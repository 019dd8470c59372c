"""fanotify(7) system calls through ctypes: the constants and a side-effect-free mark probe.

The probe marks one inode (a file it just created in a private directory), never a mount or
a filesystem, so nothing else on the host can be held up by its permission mark. The group fd
is closed before returning: the kernel then drops the mark and would allow any pending event.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import tempfile
from typing import NamedTuple

# <linux/fanotify.h>
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_CONTENT = 0x00000004
FAN_MARK_ADD = 0x00000001
FAN_OPEN_PERM = 0x00010000
FAN_OPEN_EXEC_PERM = 0x00040000

AT_FDCWD = -100

# glibc defines O_LARGEFILE as 0 on 64-bit; the kernel forces it there anyway.
EVENT_F_FLAGS = os.O_RDONLY | getattr(os, "O_LARGEFILE", 0)


class MarkResult(NamedTuple):
    ok: bool
    stage: str  # "init" | "mark" | "done"
    errno: int | None


def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    lib.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
    lib.fanotify_init.restype = ctypes.c_int
    lib.fanotify_mark.argtypes = [
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint64,
        ctypes.c_int,
        ctypes.c_char_p,
    ]
    lib.fanotify_mark.restype = ctypes.c_int
    return lib


def try_permission_mark(mask: int) -> MarkResult:
    """Create a content-class group and add ``mask`` on a private file's inode, then undo it."""
    lib = _libc()
    with tempfile.TemporaryDirectory(prefix="execguard-fan-probe-") as tmp:
        target = os.path.join(tmp, "target")
        with open(target, "wb"):
            pass
        fd = lib.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK, EVENT_F_FLAGS)
        if fd < 0:
            return MarkResult(False, "init", ctypes.get_errno())
        try:
            rc = lib.fanotify_mark(fd, FAN_MARK_ADD, mask, AT_FDCWD, os.fsencode(target))
            if rc < 0:
                return MarkResult(False, "mark", ctypes.get_errno())
            return MarkResult(True, "done", None)
        finally:
            # Closing the group removes its mark; nothing ever waits on an event.
            os.close(fd)


def errno_name(code: int | None) -> str:
    if code is None:
        return "-"
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"
