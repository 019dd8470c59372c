"""Ring-buffer records (events.h) to typed, frozen objects. Pure: bytes in, objects out.

The first byte of every record is its opcode (``enum eg_msg_op``); a table maps it to a
decoder. A short record or an unknown opcode is counted and skipped, never raised: the
consumer loop must survive anything the kernel (or a mismatched program) hands it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Dict, Optional

from agent.decision import ExecEvent, FileIdentity

EG_MSG_EXEC = 1
COMM_LEN = 16


class Op(IntEnum):
    """What a record reports (``enum eg_msg_op``); all share the exec record's layout."""

    EXEC = 1
    MMAP = 2  # a file mapped with PROT_EXEC (aux: prot)
    MPROTECT = 3  # PROT_EXEC added to a file mapping (aux: prot)
    MOUNT = 4  # a mount onto a path in scope was refused (aux: mount flags)
    PTRACE = 5  # a ptrace attach to a program in scope was refused (aux: target tgid)
    SCRIPT = 6  # kill, audit-only: an out-of-scope interpreter run for the file in path
    TAMPER = 7  # bpf-lsm self-protection refused an attempt (aux: kind << 16 | detail)


# struct eg_exec_event up to (not including) comm; path follows comm, NUL-terminated.
# uid and gid are the exec'ing task's real ids (bpf_get_current_uid_gid), not euid/egid.
EXEC_HEAD = struct.Struct("<BBBBi6I4Q")
EXEC_MIN_LEN = EXEC_HEAD.size + COMM_LEN
# Offsets of struct eg_exec_event as this module reads them (checked against BCC's layout).
EXEC_FIELDS = {
    "op": 0, "state": 1, "action": 2, "flags": 3, "kill_err": 4, "pid": 8, "ppid": 12,
    "uid": 16, "auid": 20, "dev": 24, "gid": 28, "ino": 32, "ctime_ns": 40, "size": 48,
    "boot_ns": 56, "comm": 64, "path": 80,
}  # fmt: skip

F_IN_SCOPE, F_DENIED, F_READ_ERR = 0x01, 0x02, 0x04
F_LOADER, F_PATHLESS, F_FRESH, F_WRITERS = 0x10, 0x20, 0x40, 0x80  # bpf-lsm and fmod-ret
AUID_UNSET = 0xFFFFFFFF
_MINORBITS = 20


class KernelState(IntEnum):
    """What the verdict map said when the file ran (``enum eg_state``)."""

    UNKNOWN = 0
    ALLOW = 1
    DENY = 2
    STALE = 3  # an entry whose change stamp no longer matches: unknown again


class KernelAction(IntEnum):
    """What the program did (``enum eg_action``)."""

    NONE = 0
    KILLED = 1
    KILL_FAILED = 2
    LAYER = 3  # bpf-lsm, fmod-ret: an overlay file judged by its layer file's verdict


@dataclass(frozen=True)
class ExecRecord:
    """One exec from the BPF sensor: the event plus what the kernel side knew and did."""

    event: ExecEvent
    state: KernelState
    action: KernelAction
    in_scope: bool  # the file's device is in the kernel scope
    denied: bool  # the kernel's rules deny it (killed only when in scope and kill is on)
    kill_errno: int  # bpf_send_signal's error, 0 when none
    read_error: bool  # a kernel read failed: identity fields may be 0, never trust them
    op: Op = Op.EXEC
    aux: int = 0  # per op: prot, mount flags, the ptrace target's tgid
    loader: bool = False  # a dynamic loader run as a program
    pathless: bool = False  # the file has no name (memfd, O_TMPFILE, deleted)
    fresh: bool = False  # changed since the agent started, or on a filesystem new since
    writers: bool = False  # open for write when it was mapped


def kernel_dev_to_st_dev(kdev: int) -> int:
    """``super_block.s_dev`` (MKDEV: major << 20 | minor) to ``stat().st_dev``."""
    return os.makedev(kdev >> _MINORBITS, kdev & ((1 << _MINORBITS) - 1))


def st_dev_to_kernel_dev(st_dev: int) -> int:
    """``stat().st_dev`` to the kernel's 32-bit MKDEV encoding; ValueError if it does not fit."""
    major, minor = os.major(st_dev), os.minor(st_dev)
    if major >= 1 << (32 - _MINORBITS) or minor >= 1 << _MINORBITS:
        raise ValueError(f"device {major}:{minor} does not fit the kernel's 12:20 dev_t")
    return (major << _MINORBITS) | minor


def _state(v: int) -> KernelState:
    return KernelState(v) if v in KernelState._value2member_map_ else KernelState.UNKNOWN


def _action(v: int) -> KernelAction:
    # An action this decoder does not know is reported as a failed kill, never as "none".
    return KernelAction(v) if v in KernelAction._value2member_map_ else KernelAction.KILL_FAILED


def _cstr(raw: bytes) -> str:
    end = raw.find(b"\0")
    return os.fsdecode(raw if end < 0 else raw[:end])  # undecodable bytes survive as escapes


@dataclass
class DecodeStats:
    """Records by outcome; the daemon's status and metrics show these."""

    decoded: int = 0
    short: int = 0
    unknown_op: int = 0
    by_op: Dict[int, int] = field(default_factory=dict)


class RecordDecoder:
    """Decode ring records. ``realtime_offset_ns`` maps the kernel's boot clock to wall time:
    ``CLOCK_REALTIME - CLOCK_BOOTTIME`` sampled by the caller (it moves only on clock steps).
    """

    def __init__(self, realtime_offset_ns: int, backend: str = "kill") -> None:
        self.realtime_offset_ns = realtime_offset_ns
        self.backend = backend
        self.stats = DecodeStats()
        self._ops: Dict[int, Callable[[bytes], ExecRecord]] = {op.value: self._exec for op in Op}

    def decode(self, data: bytes) -> Optional[ExecRecord]:
        """The record, or None (counted) when it is empty, short or of an unknown kind."""
        if not data:
            self.stats.short += 1
            return None
        op = data[0]
        fn = self._ops.get(op)
        if fn is None:
            self.stats.unknown_op += 1
            return None
        if len(data) < EXEC_MIN_LEN:
            self.stats.short += 1
            return None
        rec = fn(data)
        self.stats.decoded += 1
        self.stats.by_op[op] = self.stats.by_op.get(op, 0) + 1
        return rec

    def _exec(self, data: bytes) -> ExecRecord:
        (op, state, action, flags, kill_err, pid, ppid, uid, auid, kdev, gid,
         ino, ctime_ns, size, boot_ns) = EXEC_HEAD.unpack_from(data, 0)  # fmt: skip
        comm = _cstr(data[EXEC_HEAD.size : EXEC_MIN_LEN])
        path = _cstr(data[EXEC_MIN_LEN:])
        ident = FileIdentity(kernel_dev_to_st_dev(kdev), ino, ctime_ns, size)
        event = ExecEvent(
            pid=pid,
            ppid=ppid,
            uid=uid,
            auid=auid,
            comm=comm,
            path=path,
            identity=ident,
            timestamp_ns=boot_ns + self.realtime_offset_ns,
            backend=self.backend,
            gid=gid,
        )
        return ExecRecord(
            event=event,
            state=_state(state),
            action=_action(action),
            in_scope=bool(flags & F_IN_SCOPE),
            denied=bool(flags & F_DENIED),
            kill_errno=(-kill_err if kill_err < 0 else kill_err) if op == Op.EXEC else 0,
            read_error=bool(flags & F_READ_ERR),
            op=Op(op),
            aux=kill_err if op != Op.EXEC else 0,
            loader=bool(flags & F_LOADER),
            pathless=bool(flags & F_PATHLESS),
            fresh=bool(flags & F_FRESH),
            writers=bool(flags & F_WRITERS),
        )
