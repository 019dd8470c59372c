"""The scope directories the fanotify backends are given, and what they learn about an
exec's process.

The permission backend (fanotify_backend.py) marks filesystems (fanotify_marks.py) and
places each event with agent/scope; ``scope_dirs`` checks its scopes. The notification
sensor (fanotify_notify.py, audit-only) still marks mounts: ``resolve`` gives the mount that
holds each scope, plus every mount below a scope, and it filters a scope that is not a mount
point by path prefix.
"""

from __future__ import annotations

import os
import stat
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from agent.decision import ExecEvent, FileIdentity
from agent.errors import InputError
from agent.scope.mountinfo import unescape

MOUNTINFO = "/proc/self/mountinfo"


class Scopes(NamedTuple):
    dirs: Tuple[str, ...]  # real paths of the scopes
    mounts: Tuple[str, ...]  # mount points to mark
    filtered: bool  # True when some scope is not a mount point: filter by prefix


# Kernel pseudo filesystems hold nothing to exec, and some refuse mount marks (EINVAL).
PSEUDO_FS = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "securityfs", "debugfs",
    "tracefs", "bpf", "pstore", "mqueue", "hugetlbfs", "fusectl", "configfs", "autofs",
    "binfmt_misc", "efivarfs", "nsfs", "rpc_pipefs",
})


def mounts(mountinfo: str = MOUNTINFO) -> List[Tuple[str, str]]:
    """(mount point, filesystem type) for every mount, in mountinfo order."""
    out = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4:
                out.append((unescape(fields[4]), (right.split() or ["?"])[0]))
    return out


def mount_points(mountinfo: str = MOUNTINFO) -> List[str]:
    return [point for point, _ in mounts(mountinfo)]


def under(path: str, root: str) -> bool:
    """True when ``path`` is ``root`` or below it (both absolute, normalized)."""
    return root == "/" or path == root or path.startswith(root + "/")


def scope_dirs(scopes: Sequence[str]) -> List[str]:
    """Real paths of the scopes; InputError names a bad scope."""
    if not scopes:
        raise InputError("<scopes>", "no scope given: the fanotify backend marks only scopes")
    dirs: List[str] = []
    for raw in scopes:
        real = os.path.realpath(raw)
        if not os.path.isdir(real):
            raise InputError(raw, "scope is not an existing directory")
        dirs.append(real)
    return dirs


def resolve(scopes: Sequence[str], mountinfo: str = MOUNTINFO) -> Scopes:
    """Real paths of the scopes and the mounts to mark; InputError names a bad scope."""
    dirs = scope_dirs(scopes)
    table = mounts(mountinfo)
    points = [point for point, _ in table]
    marks: Dict[str, None] = {}
    filtered = False
    for real in dirs:
        holder = max((m for m in points if under(real, m)), key=len)
        marks[holder] = None
        filtered = filtered or holder != real
        for m, fstype in table:  # mounts below the scope are separate mounts: mark them too
            if m != real and under(m, real) and fstype not in PSEUDO_FS:
                marks[m] = None
    return Scopes(tuple(dirs), tuple(marks), filtered)


class ProcInfo(NamedTuple):
    ppid: int
    uid: int
    auid: int
    comm: str
    gid: Optional[int] = None  # None: unknown (policy rules on gids then never match)


def _read(path: str) -> bytes:
    # os.open/os.read: a third of the cost of open(); this runs for every event.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _field(status: bytes, key: bytes) -> bytes:
    start = status.index(key) + len(key)
    end = status.find(b"\n", start)
    return status[start : None if end < 0 else end].strip()


def proc_info(pid: int) -> ProcInfo:
    """ppid, real uid, loginuid, comm and real gid of a process, best effort (-1 / "" /
    None when gone).

    Only /proc/<pid>/status and loginuid: neither takes the exec locks that a task holds
    while the kernel waits for our answer. The process is blocked in execve before its
    credentials change, so these are the caller's ids. Real, not effective, ids: the BPF
    sensors report real ids (bpf_get_current_uid_gid), and a policy rule must mean the same
    on every backend; they differ only when the caller itself runs set-id."""
    ppid = uid = auid = -1
    gid: Optional[int] = None
    comm = ""
    try:
        status = _read(f"/proc/{pid}/status")
        comm = _field(status, b"Name:").decode("utf-8", "replace")
        ppid = int(_field(status, b"\nPPid:"))
        uid = int(_field(status, b"\nUid:").split()[0])  # real, effective, saved, fs
        gid = int(_field(status, b"\nGid:").split()[0])  # real, effective, saved, fs
        auid = int(_read(f"/proc/{pid}/loginuid"))
    except (OSError, ValueError, IndexError):
        pass
    return ProcInfo(ppid, uid, auid, comm, gid)


def parent_of(pid: int) -> Tuple[int, int]:
    """(ppid, start time in clock ticks) from /proc/<pid>/stat, or (-1, -1)."""
    try:
        stat = _read(f"/proc/{pid}/stat")
        # comm (field 2) may hold spaces and parentheses: split after the last ')'.
        rest = stat[stat.rindex(b")") + 2 :].split()
        return int(rest[1]), int(rest[19])  # fields 4 (ppid) and 22 (starttime)
    except (OSError, ValueError, IndexError):
        return -1, -1


def descends_from(pid: int, ancestor: int, born: Optional[int] = None, depth: int = 64) -> bool:
    """True when ``ancestor`` (which started at ``born`` ticks) is a parent, grandparent...
    of ``pid``. The walk stops at the first process older than ``ancestor``: a descendant
    cannot be older than its ancestor, so a shell that predates the agent ends it at once."""
    if born is None:
        born = parent_of(ancestor)[1]
    cur = pid
    for _ in range(depth):
        ppid, start = parent_of(cur)
        if ppid == ancestor:
            return True
        if ppid <= 1 or start < born:
            return False
        cur = ppid
    return False


def file_identity(st: os.stat_result) -> FileIdentity:
    return FileIdentity(st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns)


def is_executable(mode: int) -> bool:
    """A regular file with an x bit: anything else cannot be execve'd."""
    return stat.S_ISREG(mode) and bool(mode & 0o111)


def exec_event(pid: int, path: str, st: Optional[os.stat_result], backend: str) -> ExecEvent:
    """The ExecEvent for an event fd: identity from its fstat (None: it could not be
    read, and the identity is zeros: the record of an exec denied for that), the rest
    from /proc."""
    info = proc_info(pid)
    return ExecEvent(
        pid=pid,
        ppid=info.ppid,
        uid=info.uid,
        auid=info.auid,
        comm=info.comm,
        path=path,
        identity=file_identity(st) if st is not None else FileIdentity(0, 0, 0, 0),
        timestamp_ns=time.time_ns(),
        backend=backend,
        gid=info.gid,
    )
