"""The fanotify backend's answers as its callers see them: why each event got its answer."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional, Tuple, Union

from agent.decision import ExecEvent


class Cause(str, Enum):
    """Why an event got the answer it got."""

    DECIDED = "decided"  # decide() answered in time
    SHARED = "shared"  # the same file was being decided for another exec: that answer
    CACHED = "cached"  # lookup() answered on the loop thread, decide() was not called
    TIMEOUT = "timeout"  # deadline passed: the on_timeout answer
    LATE = "late"  # decide() returned after the timeout answer (recorded, not applied)
    EXEMPT = "exempt"  # the agent itself, its descendants, or an exempt pid
    OUT_OF_SCOPE = "out-of-scope"  # on a marked mount but outside every scope directory
    NOT_EXECUTABLE = "not-executable"  # FAN_OPEN_PERM only: no x bit, cannot be exec'd
    CHANGED = "changed"  # the file changed while it was being decided: denied
    ERROR = "error"  # decide() raised, or the event could not be read: denied
    STOPPING = "stopping"  # still pending at stop(): the on_timeout answer
    OVERLOAD = "overload"  # over the cap of execs waiting for a decision: denied at once
    OPENED = "opened"  # an open, not an exec, on a write-guarded filesystem: allowed


@dataclass(frozen=True)
class Outcome:
    cause: Cause
    allowed: bool  # for LATE: what decide() returned
    pid: int
    path: str
    event: Optional[ExecEvent]
    latency_us: int  # from reading the event to answering it (LATE: to decide's return)
    detail: str = ""
    leader: Optional[ExecEvent] = None  # SHARED: the exec whose decide() gave the answer


class AllowOnce:
    """decide()'s answer for an exec that runs although its verdict is not an allow (a
    monitor rule's would-deny in an enforce policy): answered allow, but never remembered
    and no ignore mark, so the file is judged again at its next exec, by any path (a
    rename keeps a mark)."""

    def __bool__(self) -> bool:
        return True


ALLOW_ONCE = AllowOnce()
Decide = Callable[[ExecEvent, int], Union[bool, AllowOnce]]
Lookup = Callable[[ExecEvent], Optional[bool]]
Observer = Callable[[Outcome], None]


FileKey = Tuple[int, int, int, int]  # (dev, ino, ctime ns, size): one version of one file


class Pending:
    """An event handed to decide(): the loop and a worker race to answer it once.
    ``done``: decide() no longer reads ``fd`` (whoever answers last closes it)."""

    def __init__(self, fd: int, event: ExecEvent, t0: int, deadline: float,
                 markable: bool = False, writes: Optional[Tuple[int, int]] = None) -> None:
        self.fd, self.event, self.t0, self.deadline = fd, event, t0, deadline
        self.answered = False
        self.done = False
        # on a write-guarded filesystem: an allow may leave an ignore mark (fanotify_writes)
        self.markable = markable
        # the file's write-open count (fanotify_writes.WriteOpens) when the event came in
        self.writes = writes

    @property
    def key(self) -> FileKey:
        ident = self.event.identity
        return (ident.dev, ident.ino, ident.ctime_ns, ident.size)
