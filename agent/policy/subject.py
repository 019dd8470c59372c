"""Build a policy ``Subject`` from an opened file: the policy's reading of its Go evidence.

Kept apart from ``evaluate`` because it reads the file. The interpretation is policy:
build info makes a file Go; so does the Go runtime's pclntab when the build info is missing
(stripped or zeroed build info does not change what runs); broken build info or a hostile
file means "Go, with nothing provable", so Go rules apply and fail closed. Only a file with
neither is "not Go".
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from typing import Tuple

from agent.digest import Artifact
from agent.errors import InputError
from agent.goinfo import GoEvidence, inspect_go
from agent.policy.model import Subject

Identity = Tuple[int, int, int, int, int]  # dev, ino, ctime_ns, mtime_ns, size


class _GoCache:
    """Go evidence per file version, so that a file that is not Go (read in full by the
    runtime scan) costs that scan once, not at every exec the kernel cannot answer alone.
    Keyed like the verdict cache: a write changes ctime, and the entry no longer applies.
    Timestamps are coarse (a clock tick), so two writes close together may share a ctime:
    only a file whose ctime is older than ``SETTLED_NS`` is remembered."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[Identity, GoEvidence] = OrderedDict()

    def get(self, key: Identity) -> GoEvidence | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: Identity, value: GoEvidence) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


_CACHE = _GoCache()
SETTLED_NS = 1_000_000_000  # far beyond any timestamp granularity (jiffies, 1 s on old fs)


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size)


def _go_evidence(artifact: Artifact, st: os.stat_result, name: str,
                 fresh: bool = False) -> GoEvidence:
    key = _identity(st)
    found = None if fresh else _CACHE.get(key)
    if found is not None:
        return found
    found = inspect_go(artifact)
    try:
        unchanged = _identity(os.fstat(artifact.fd)) == key
    except OSError as exc:
        raise InputError(name, f"fstat failed: {exc.strerror or exc}") from None
    settled = time.time_ns() - st.st_ctime_ns > SETTLED_NS
    if unchanged and settled:  # a file written while, or just before, it was read: read again
        _CACHE.put(key, found)
    return found


def subject_of(artifact: Artifact, uid: int, path: str | None = None,
               gid: int | None = None, fresh: bool = False) -> Subject:
    """The subject for ``artifact`` exec'd by ``uid`` (and ``gid``, None when the sensor
    does not know it); ``path`` defaults to the artifact's. ``fresh``: read the file again
    even when its identity is known (the bytes may have changed under the same stamp: a
    write through a shared mapping made writable earlier changes no time on tmpfs).

    The file's owner comes from fstat of the artifact's own fd: the file that is exec'd,
    not whatever the path names by now. Raises ``InputError`` when the file cannot be read.
    """
    name = path if path is not None else artifact.path
    try:
        st = os.fstat(artifact.fd)
    except OSError as exc:
        raise InputError(name, f"fstat failed: {exc.strerror or exc}") from None
    found = _go_evidence(artifact, st, name, fresh)
    return Subject(name, uid, gid=gid, owner_uid=st.st_uid, owner_gid=st.st_gid,
                   go=found.is_go, buildinfo=found.buildinfo,
                   go_evidence=found.established_by, go_detail=found.detail,
                   go_runtime=found.runtime.describe() if found.runtime else None)
