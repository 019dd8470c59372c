"""fanotify(7) system calls through ctypes: constants, group and mark calls, event parsing,
responses, and the side-effect-free mark probe that `execguard doctor` runs.

The probe marks one inode (a file it just created in a private directory), never a mount or
a filesystem, so nothing else on the host can be held up by its permission mark. The group fd
is closed before returning: the kernel then drops the mark and would allow any pending event.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
import tempfile
import threading
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

# <linux/fanotify.h>: fanotify_init flags
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_CONTENT = 0x00000004
FAN_CLASS_PRE_CONTENT = 0x00000008  # asked before content-class groups
FAN_UNLIMITED_QUEUE = 0x00000010
FAN_UNLIMITED_MARKS = 0x00000020
# fanotify_mark flags
FAN_MARK_ADD = 0x00000001
FAN_MARK_REMOVE = 0x00000002
FAN_MARK_MOUNT = 0x00000010
FAN_MARK_IGNORED_MASK = 0x00000020
FAN_MARK_FLUSH = 0x00000080  # without MOUNT/FILESYSTEM: every inode mark
FAN_MARK_FILESYSTEM = 0x00000100
# event masks
FAN_OPEN_PERM = 0x00010000
FAN_OPEN_EXEC_PERM = 0x00040000
FAN_Q_OVERFLOW = 0x00004000
# responses
FAN_ALLOW = 0x01
FAN_DENY = 0x02
FAN_NOFD = -1
FANOTIFY_METADATA_VERSION = 3

AT_FDCWD = -100

# glibc defines O_LARGEFILE as 0 on 64-bit; the kernel forces it there anyway.
# O_NONBLOCK: the kernel opens each event's file in our read(2). A FIFO (no writer yet) or a
# file under another process's write lease would otherwise hold that read, and every
# answer behind it; non-blocking, the open of a FIFO returns at once and a leased file's
# open fails (EWOULDBLOCK: the kernel denies that one event). Reads of regular files
# ignore the flag.
EVENT_F_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_LARGEFILE", 0)

# struct fanotify_event_metadata: event_len u32, vers u8, reserved u8, metadata_len u16,
# mask u64 (8-aligned, at offset 8), fd s32, pid s32. 24 bytes, no padding.
_METADATA = struct.Struct("=IBBHQii")
METADATA_LEN = _METADATA.size
# struct fanotify_response: fd s32, response u32.
_RESPONSE = struct.Struct("=iI")

# In order of preference.
MASK_NAMES = {FAN_OPEN_EXEC_PERM: "FAN_OPEN_EXEC_PERM", FAN_OPEN_PERM: "FAN_OPEN_PERM"}


class MarkResult(NamedTuple):
    ok: bool
    stage: str  # "init" | "mark" | "done"
    errno: int | None


class Event(NamedTuple):
    """One fanotify_event_metadata record; ``fd`` is an open fd the reader must close."""

    mask: int
    fd: int
    pid: int


_LIB: Optional[ctypes.CDLL] = None


def _libc() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
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
        _LIB = lib
    return _LIB


def _raise(what: str, path: Optional[str] = None) -> None:
    code = ctypes.get_errno()
    if path is None:
        raise OSError(code, f"{what}: {os.strerror(code)}")
    raise OSError(code, f"{what}: {os.strerror(code)}", path)


def fanotify_init(flags: int, event_f_flags: int) -> int:
    """fanotify_init(2); returns the group fd or raises OSError."""
    fd = int(_libc().fanotify_init(flags, event_f_flags))
    if fd < 0:
        _raise("fanotify_init")
    return fd


def fanotify_mark(group_fd: int, flags: int, mask: int, dirfd: int, path: Optional[str]) -> None:
    """fanotify_mark(2). With ``path`` None the object is the file ``dirfd`` refers to."""
    raw = None if path is None else os.fsencode(path)
    if _libc().fanotify_mark(group_fd, flags, mask, dirfd, raw) < 0:
        _raise("fanotify_mark", path)


def mark_through_fd(group_fd: int, flags: int, mask: int, fd: int) -> None:
    """fanotify_mark(2) on what the open fd ``fd`` (O_PATH is enough) refers to: its mount
    (FAN_MARK_MOUNT), its filesystem (FAN_MARK_FILESYSTEM) or its inode. The kernel follows
    /proc/self/fd/N to the fd's own mount and dentry, so the one path lookup that could wait
    (a stalled FUSE or network mount on the way) was the caller's open, not this call."""
    fanotify_mark(group_fd, flags, mask, AT_FDCWD, f"/proc/self/fd/{fd}")


def ignore_mark(group_fd: int, mask: int, fd: int, add: bool = True) -> None:
    """Add (or remove) an ignore mark on the file ``fd`` refers to. Never with
    FAN_MARK_IGNORED_SURV_MODIFY: the kernel then also clears it at each write(2), refuses
    it while the inode is open for write, and the caller removes it at each write-open of
    a write-guarded filesystem (fanotify_writes.py)."""
    flags = (FAN_MARK_ADD if add else FAN_MARK_REMOVE) | FAN_MARK_IGNORED_MASK
    fanotify_mark(group_fd, flags, mask, fd, None)


class GroupMarks(NamedTuple):
    """A group's marks as the kernel lists them in /proc/self/fdinfo/GROUP."""

    filesystems: Dict[int, int]  # st_dev (os.makedev) of each marked filesystem -> its mask
    mounts: Dict[int, int]  # mount id (as in mountinfo) of each marked mount -> its mask
    inodes: int = 0  # inode marks (ignore marks among them): the permission group has none


def kernel_dev(value: int) -> int:
    """The kernel's internal dev_t (major << 20 | minor, as fdinfo prints it) as stat()'s."""
    return os.makedev(value >> 20, value & 0xFFFFF)


def group_marks(group_fd: int) -> GroupMarks:
    """The marks of a group, from the kernel: "fanotify sdev:%x ..." lines are filesystem
    marks, "fanotify mnt_id:%x ..." mount marks, "fanotify ino:%lx ..." inode marks."""
    with open(f"/proc/self/fdinfo/{group_fd}", encoding="ascii", errors="replace") as f:
        text = f.read()
    devs: Dict[int, int] = {}
    mounts: Dict[int, int] = {}
    inodes = 0
    for line in text.splitlines():
        if not line.startswith("fanotify "):
            continue
        fields = dict(f.partition(":")[::2] for f in line.split(" ")[1:])
        try:
            mask = int(fields.get("mask", "0"), 16)
            if "ino" in fields:  # an inode mark's line names its filesystem (sdev:) too
                inodes += 1
            elif "mnt_id" in fields:
                mounts[int(fields["mnt_id"], 16)] = mask
            elif "sdev" in fields:
                devs[kernel_dev(int(fields["sdev"], 16))] = mask
        except ValueError:
            continue
    return GroupMarks(devs, mounts, inodes)


def parse_events(buf: bytes) -> Tuple[List[Event], str]:
    """Split one read(2) of a group fd into events, and an error text ("" when none).

    On a record the kernel should never produce (another metadata version, a bad length)
    the events before it are still returned: the caller must answer them."""
    events: List[Event] = []
    off = 0
    while off + METADATA_LEN <= len(buf):
        event_len, vers, _res, _meta_len, mask, fd, pid = _METADATA.unpack_from(buf, off)
        if vers != FANOTIFY_METADATA_VERSION or event_len < METADATA_LEN:
            return events, (
                f"fanotify event at offset {off}: metadata version {vers}, length "
                f"{event_len} (this agent reads version {FANOTIFY_METADATA_VERSION})"
            )
        events.append(Event(mask, fd, pid))
        off += event_len
    if off != len(buf):
        return events, f"fanotify read of {len(buf)} bytes ends inside an event"
    return events, ""


def respond(group_fd: int, event_fd: int, allow: bool) -> None:
    """Answer a permission event. Raises OSError (ENOENT: no such pending event)."""
    os.write(group_fd, _RESPONSE.pack(event_fd, FAN_ALLOW if allow else FAN_DENY))


def try_permission_mark(mask: int) -> MarkResult:
    """Create a content-class group and add ``mask`` on a private file's inode, then undo it."""
    with tempfile.TemporaryDirectory(prefix="execguard-fan-probe-") as tmp:
        target = os.path.join(tmp, "target")
        with open(target, "wb"):
            pass
        try:
            fd = fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK, EVENT_F_FLAGS)
        except OSError as e:
            return MarkResult(False, "init", e.errno)
        try:
            fanotify_mark(fd, FAN_MARK_ADD, mask, AT_FDCWD, target)
            return MarkResult(True, "done", None)
        except OSError as e:
            return MarkResult(False, "mark", e.errno)
        finally:
            # Closing the group removes its mark; nothing ever waits on an event.
            os.close(fd)


def errno_name(code: int | None) -> str:
    if code is None:
        return "-"
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"


def notification_batches(group_fd: int, stop: threading.Event, wait_s: float = 0.2,
                         on_turn: Optional[Callable[[], None]] = None
                         ) -> Iterator[Tuple[List[Event], str]]:
    """Batches of events from a non-blocking notification group until ``stop`` is set or
    the group is closed; each as ``parse_events`` returns it (the caller closes every fd).
    ``on_turn`` is called at every wait, idle or not (a heartbeat). A failed read (EMFILE,
    ENOMEM: the kernel drops the notification it could not hand over) comes back as an
    empty batch with the error text, and the next read waits a moment: never a dead loop."""
    poller = select.poll()
    poller.register(group_fd, select.POLLIN)
    while not stop.is_set():
        if on_turn is not None:
            on_turn()
        try:
            ready = poller.poll(int(wait_s * 1000))
        except OSError as exc:  # EINVAL: RLIMIT_NOFILE lowered below 1; ENOMEM
            yield [], f"poll: {errno_name(exc.errno)}"
            stop.wait(min(wait_s, 0.05))
            ready = [(group_fd, select.POLLIN)]  # non-blocking: just try the read
        if any(ev & select.POLLNVAL for _, ev in ready):
            return  # the group was closed
        if not ready:
            continue
        try:
            data = os.read(group_fd, 64 * 1024)
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno == errno.EBADF:
                return
            yield [], f"read: {errno_name(exc.errno)}"
            stop.wait(min(wait_s, 0.05))
            continue
        yield parse_events(data)
