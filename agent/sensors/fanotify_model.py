"""The fanotify backend's answers as its callers see them: why each event got its answer."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional, Union

from agent.decision import ExecEvent


class Cause(str, Enum):
    """Why an event got the answer it got."""

    DECIDED = "decided"  # decide() answered in time
    CACHED = "cached"  # lookup() answered on the loop thread, decide() was not called
    TIMEOUT = "timeout"  # deadline passed: the on_timeout answer
    LATE = "late"  # decide() returned after the timeout answer (recorded, not applied)
    EXEMPT = "exempt"  # the agent itself, its descendants, or an exempt pid
    OUT_OF_SCOPE = "out-of-scope"  # on a marked mount but outside every scope directory
    NOT_EXECUTABLE = "not-executable"  # FAN_OPEN_PERM only: no x bit, cannot be exec'd
    CHANGED = "changed"  # the file changed while it was being decided: denied
    ERROR = "error"  # decide() raised, or the event could not be read: denied
    STOPPING = "stopping"  # still pending at stop(): the on_timeout answer


@dataclass(frozen=True)
class Outcome:
    cause: Cause
    allowed: bool  # for LATE: what decide() returned
    pid: int
    path: str
    event: Optional[ExecEvent]
    latency_us: int  # from reading the event to answering it (LATE: to decide's return)
    detail: str = ""


class AllowOnce:
    """decide()'s answer for an exec that runs although its verdict is not an allow (a
    monitor rule's would-deny in an enforce policy): answered allow, but no ignore mark, so
    the file is asked again at its next exec, by any path (a rename keeps the mark)."""

    def __bool__(self) -> bool:
        return True


ALLOW_ONCE = AllowOnce()
Decide = Callable[[ExecEvent, int], Union[bool, AllowOnce]]
Lookup = Callable[[ExecEvent], Optional[bool]]
Observer = Callable[[Outcome], None]


class Pending:
    """An event handed to decide(): the loop and a worker race to answer it once."""

    def __init__(self, fd: int, event: ExecEvent, t0: int, deadline: float) -> None:
        self.fd, self.event, self.t0, self.deadline = fd, event, t0, deadline
        self.answered = False
        self.done = False
