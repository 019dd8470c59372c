"""What the agent decided about one exec, with its provenance: the type every writer serializes."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Optional

from agent.errors import Reason
from agent.verify.model import Evidence


class Enforcement(str, Enum):
    """The enforcement that really applied (docs/architecture.md decision 5). A public contract."""

    LSM_DENY = "lsm-deny"
    FMOD_RET_DENY = "fmod-ret-deny"
    FANOTIFY_DENY = "fanotify-deny"
    POST_EXEC_KILL = "post-exec-kill"
    AUDIT_ONLY = "audit-only"
    MONITOR = "monitor"
    NONE = "none"  # allowed: nothing needed enforcing


class Source(str, Enum):
    """Where the verdict came from."""

    CACHE = "cache"
    VERIFY = "verify"
    RULE = "rule"
    DEFAULT = "default"  # the mode's default for an unknown binary (e.g. on timeout)


@dataclass(frozen=True)
class FileIdentity:
    """(dev, ino) plus the change stamp: a file changed after verification is unknown again.

    ``mtime_ns`` rides along where the identity came from fstat() (0 where a kernel record
    made it) and is not part of equality: the BPF LSM map compares it only after a rename
    or a link moved the ctime but not the bytes."""

    dev: int
    ino: int
    ctime_ns: int
    size: int
    mtime_ns: int = field(default=0, compare=False)


@dataclass(frozen=True)
class ExecEvent:
    """One exec as a sensor saw it."""

    pid: int
    ppid: int
    uid: int
    auid: int
    comm: str
    path: str
    identity: FileIdentity
    timestamp_ns: int  # CLOCK_REALTIME when the sensor saw it
    backend: str  # sensor that produced it: bpf-lsm | fanotify-exec | kill | ...
    exe: Optional[str] = None  # the exec'ing process's executable before the exec, if known
    gid: Optional[int] = None
    # the path the policy's path rules see, when not ``path``: a path only another mount
    # namespace gives the file (agent/scope Placement.judged_path) matches no path glob
    rules_path: Optional[str] = None


@dataclass(frozen=True)
class Decision:
    """allow or deny, why, how it was enforced, and the evidence to re-verify it later."""

    event: ExecEvent
    allow: bool
    reason: Reason
    detail: str
    enforcement: Enforcement
    source: Source
    sha256: Optional[str] = None
    evidence: Optional[Evidence] = None
    rule_id: Optional[str] = None
    policy_version: Optional[int] = None
    policy_digest: Optional[str] = None
    go: Optional[Dict[str, Any]] = None  # build info summary (module path, version, go)
    latency_us: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)
