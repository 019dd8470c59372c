"""Pinned enforcement: BPF links in bpffs outlive the agent (policy ``on_agent_exit``).

A BPF LSM program stays attached while anything holds its link: the agent's descriptor,
or a pin in bpffs. With ``keep-enforcing`` the links are pinned under
``/sys/fs/bpf/execguard/<backend>_<pid>_<start ticks>``. When the agent dies (by a way its
self-protection cannot refuse: the OOM killer, cgroup.kill, a crash) the programs go on
judging from the verdict map they hold. Only the agent removes its pins (``PinSet.remove``,
on an authorized stop); a reboot empties bpffs. The pins, the ids of every map, program and
link, and the pin directory are what the self-protection hooks guard (exec_verdict.h,
EG_PROTECT).

Raw ``bpf(2)`` through ctypes: BCC has no call for an object's id, and its pin helper is
the same syscall.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from agent.sensors.bpf.maps import (
    LOOKUP,
    OBJ_GET_INFO_BY_FD,
    BpfCallError,
    ElemAttr,
    InfoAttr,
    bpf,
    possible_cpus,
)

BPFFS = "/sys/fs/bpf"
PIN_ROOT = f"{BPFFS}/execguard"
BPF_FS_MAGIC = 0xCAFE4A11
_BPF_OBJ_PIN, _BPF_OBJ_GET = 6, 7
_BPF_F_RDONLY = 1 << 3
# EG_GUARD_* in exec_verdict.h
GUARD_DIR, GUARD_PIN, GUARD_FILE, GUARD_RO, GUARD_ABOVE = 1, 2, 4, 8, 16
STATS_PIN = "map_stats"
# bpffs refuses names with a dot (it keeps them for itself): underscores separate
_DIR_NAME = re.compile(r"(?P<backend>[a-z-]+)_(?P<pid>[0-9]+)_(?P<start>[0-9]+)\Z")

class PinError(OSError):
    """A pin could not be made, read or removed."""


class _PinAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32)]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    try:
        return bpf(cmd, attr)
    except BpfCallError as exc:
        raise PinError(exc.errno, str(exc)) from None


def obj_id(fd: int) -> int:
    """The id of the map, program or link behind ``fd`` (each info struct starts with
    ``__u32 type; __u32 id``)."""
    info = (ctypes.c_uint32 * 2)()
    attr = InfoAttr(fd, ctypes.sizeof(info), ctypes.addressof(info))
    _bpf(OBJ_GET_INFO_BY_FD, attr)
    return int(info[1])


def obj_pin(fd: int, path: str) -> None:
    name = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(_BPF_OBJ_PIN, _PinAttr(ctypes.addressof(name), fd, 0))


def obj_get_readonly(path: str) -> int:
    """A read-only descriptor for the map pinned at ``path`` (what self-protection lets
    anyone open: a restarted agent reads an orphan's counters)."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(_BPF_OBJ_GET, _PinAttr(ctypes.addressof(name), 0, _BPF_F_RDONLY))


def percpu_sum(fd: int, index: int) -> int:
    """One u64 slot of a per-CPU array, summed over the possible CPUs."""
    cpus = possible_cpus()
    key = ctypes.c_uint32(index)
    values = (ctypes.c_uint64 * cpus)()
    _bpf(LOOKUP, ElemAttr(fd, 0, ctypes.addressof(key), ctypes.addressof(values), 0))
    return int(sum(values))


def is_bpffs(path: str) -> bool:
    """A bpf filesystem is mounted at ``path`` (this mount namespace)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            left, sep, right = line.partition(" - ")
            fields = left.split()
            if sep and len(fields) > 4 and fields[4] == path and right.split()[:1] == ["bpf"]:
                return True
    return False


def start_ticks(pid: int) -> int:
    """When process ``pid`` started, in clock ticks since boot (/proc/PID/stat field 22):
    with the pid, it names one process for the life of the boot."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2:].split()[19])


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf when nothing is there (systemd mounts it at boot)."""
    if is_bpffs(BPFFS):
        return
    proc = subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], capture_output=True,
                          timeout=10, check=False)
    if proc.returncode != 0 or not is_bpffs(BPFFS):
        raise PinError(errno.ENODEV, f"cannot mount bpffs at {BPFFS}: "
                       f"{proc.stderr.decode(errors='replace').strip()}")


@dataclass
class PinSet:
    """The pins of one agent: its links by program name, in one directory."""

    directory: str
    links: Dict[str, str] = field(default_factory=dict)  # program -> pin path
    link_fds: Dict[str, int] = field(default_factory=dict)  # program -> the agent's fd

    @classmethod
    def create(cls, backend: str, links: Dict[str, int], stats_fd: int) -> PinSet:
        """Pin every link (program name -> link fd), and the counters, under a fresh
        directory of ours."""
        ensure_bpffs()
        os.makedirs(PIN_ROOT, mode=0o700, exist_ok=True)
        directory = f"{PIN_ROOT}/{backend}_{os.getpid()}_{start_ticks(os.getpid())}"
        os.mkdir(directory, 0o700)
        pins = cls(directory)
        try:
            for name, fd in sorted(links.items()):
                path = f"{directory}/link_{name}"
                obj_pin(fd, path)
                pins.links[name], pins.link_fds[name] = path, fd
            obj_pin(stats_fd, f"{directory}/{STATS_PIN}")
        except OSError:
            pins.remove()
            raise
        return pins

    def inodes(self) -> List[Tuple[int, int, int]]:
        """(st_dev, st_ino, EG_GUARD_* flags) of bpffs's root and our pin root (neither
        moved nor mounted over; a successor makes its own directory there), our directory
        and every pin."""
        out = []
        stats = f"{self.directory}/{STATS_PIN}"
        for path in (BPFFS, PIN_ROOT, self.directory, *self.links.values(), stats):
            st = os.stat(path)
            if path in (BPFFS, PIN_ROOT):
                flags = GUARD_ABOVE
            elif path == self.directory:
                flags = GUARD_DIR
            else:
                flags = GUARD_PIN | (GUARD_RO if path == stats else 0)
            out.append((st.st_dev, st.st_ino, flags))
        return out

    def remove(self) -> None:
        """Unpin (each link goes when its last holder does) and remove the directory."""
        for path in list(self.links.values()):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.directory}/{STATS_PIN}")
        self.links.clear()
        self.link_fds.clear()
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(self.directory)


@dataclass(frozen=True)
class Orphan:
    """Pins left by an agent that is gone: its programs still enforce."""

    directory: str
    backend: str
    pid: int
    links: int
    counters: Dict[str, int]  # from its pinned stats map (empty when unreadable)


def orphans(counters: Tuple[str, ...], root: str = PIN_ROOT) -> List[Orphan]:
    """Pin directories whose agent no longer runs (its pid is gone or names another
    process), with their ``counters`` (the stats map's slot names, in order)."""
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return []
    out = []
    for name in entries:
        m = _DIR_NAME.match(name)
        if m is None:
            continue
        pid = int(m["pid"])
        try:
            if start_ticks(pid) == int(m["start"]):
                continue  # that agent still runs
        except (OSError, ValueError, IndexError):
            pass
        try:
            count = sum(n.startswith("link_") for n in os.listdir(f"{root}/{name}"))
        except OSError:
            count = -1
        out.append(Orphan(f"{root}/{name}", m["backend"], pid, count,
                          read_counters(f"{root}/{name}/{STATS_PIN}", counters)))
    return out


def read_counters(path: str, names: Tuple[str, ...]) -> Dict[str, int]:
    """The per-CPU counters pinned at ``path``, by name ({} when they cannot be read)."""
    try:
        fd = obj_get_readonly(path)
    except OSError:
        return {}
    try:
        return {n: percpu_sum(fd, i) for i, n in enumerate(names)}
    except OSError:
        return {}
    finally:
        os.close(fd)
