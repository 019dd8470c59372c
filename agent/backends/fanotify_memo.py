"""The fanotify runner's memory of allows that stand for a file version.

With ``PolicySnapshot.file_decides`` (no rule looks at the caller or tells paths apart) an
allow depends on the file's bytes and their signature alone, which is also what an ignore
mark assumes. Such allows are remembered here by the full identity (dev, ino, ctime ns,
size), for the snapshot they were decided under, so the fanotify loop can answer a later
exec of the same version at once (``FanotifyBackend``'s ``lookup``) instead of queueing it
behind a flood of unknown files. Reads happen on the loop thread: plain dict operations,
no lock, nothing that can block.

An entry stands for bytes only as long as the stamp follows them. The loop makes the memo
``forget`` an inode before it answers a write-open of it on a filesystem where a write
through a mapping may keep the stamp (agent/sensors/fanotify_writes.py); the runner keeps
nothing for files where neither holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from agent.decision import Decision, FileIdentity
from agent.policy import Mode, PolicySnapshot

# ~3 KiB a decision; past it the memo starts again empty (a miss costs one decision on a
# worker, a trusted-cache hit)
MAX_ENTRIES = 4096
Key = Tuple[int, int, int, int]
Inode = Tuple[int, int]


@dataclass
class Remembered:
    """An allow, with the decision it came from (an exec's, or a pre-warmed file's): the
    record of a later exec answered from memory copies it. ``recorded``: a hit of it is in
    the decision log already (the observer's thread alone sets it)."""

    decision: Decision
    recorded: bool = False


def key_of(identity: FileIdentity) -> Key:
    return (identity.dev, identity.ino, identity.ctime_ns, identity.size)


def may_remember(snapshot: PolicySnapshot, path: str) -> bool:
    """An allow under ``snapshot`` for ``path`` stands for the file version wherever and
    by whomever it is exec'd (no rule on the caller or on paths, and inside a scope)."""
    return snapshot.file_decides and snapshot.in_scope(path)


def runs_means_allows(snapshot: PolicySnapshot) -> bool:
    """Pre-warming reports "runs", which in an enforce policy with monitor rules includes a
    monitor rule's would-deny: that one must be asked again at each exec (answer_for's
    ALLOW_ONCE), never remembered. (The runner decides the file again before it remembers
    anything; this only spares it the work.)"""
    return snapshot.mode is Mode.MONITOR or all(r.mode is not Mode.MONITOR
                                                 for r in snapshot.rules)


class AllowMemo:
    """Allows decided under one policy snapshot; a new snapshot gets a new memo."""

    def __init__(self, snapshot: PolicySnapshot) -> None:
        self.snapshot = snapshot
        # by inode: one version of a file at a time, and forget() finds it at once
        self._entries: Dict[Inode, Tuple[Key, Remembered]] = {}

    def get(self, identity: FileIdentity) -> Optional[Remembered]:
        held = self._entries.get((identity.dev, identity.ino))
        return held[1] if held is not None and held[0] == key_of(identity) else None

    def put(self, identity: FileIdentity, decision: Decision) -> None:
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()  # lock-free and bounded
        self._entries[(identity.dev, identity.ino)] = (key_of(identity), Remembered(decision))

    def forget(self, dev: int, ino: int) -> None:
        """Every version of the inode (on the loop, before a write-open is answered)."""
        self._entries.pop((dev, ino), None)

    def __len__(self) -> int:
        return len(self._entries)
