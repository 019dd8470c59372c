"""The agent's file-descriptor limit: raised to the hard limit at start, shown in status.

Every fanotify permission event the agent has read holds an fd until it is answered, so a
flood of execs meets the fd limit long before memory. The soft limit (1024 by default
outside systemd; the unit sets ``LimitNOFILE=``) is raised to the hard one when the agent
starts. Nothing depends on it for safety: when fds run out anyway (someone lowered the
limit with ``prlimit``), the kernel denies each permission event it cannot hand over and
the agent counts the failed reads (docs/fanotify.md, "When fds run out").
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional


@dataclass(frozen=True)
class FdLimit:
    soft_at_start: int
    hard_at_start: int
    raised: bool  # the soft limit was raised to the hard one
    error: Optional[str] = None  # why it could not be


def _shown(value: int) -> Any:
    return "unlimited" if value == resource.RLIM_INFINITY else value


def raise_fd_limit() -> FdLimit:
    """Soft RLIMIT_NOFILE := hard, when it is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return FdLimit(soft, hard, False)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        return FdLimit(soft, hard, False, str(exc))
    return FdLimit(soft, hard, True)


def open_fds() -> Optional[int]:
    """How many fds the agent holds (None when even that cannot be read: out of fds)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own fd
    except OSError:
        return None


def status_section(at_start: FdLimit) -> Callable[[Dict[str, Any]], None]:
    """``status``'s ``fd_limit``: the limit now (it can be lowered from outside), at start,
    and the fds in use."""
    def section(out: Dict[str, Any]) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        out["fd_limit"] = {
            "soft": _shown(soft), "hard": _shown(hard), "open": open_fds(),
            "at_start": {"soft": _shown(at_start.soft_at_start),
                         "hard": _shown(at_start.hard_at_start)},
            "raised_at_start": at_start.raised, "error": at_start.error,
        }
    return section
