"""Tail the decision log across rotation (``execguard denials --follow``).

The writer renames ``decisions.jsonl`` to ``.1`` (and ``.1`` to ``.2`` …) and starts a new
file. The follower keeps the file it was reading open by descriptor, so after a rename it
still reads that file to its end, then takes every file it has not read yet (by device and
inode, oldest first) — also when several rotations happened between two polls. A file cut
back in place (copytruncate) is read again from its start.

An inode number is reused once the oldest rotated file is deleted, so a file counts as
already read only if its first bytes (which hold the first record's unique id) match too.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Callable, Dict, List, Optional, Tuple

from agent.errors import MalformedInput
from agent.record import LogFormatError, LoggedDecision
from agent.record.decision_log import LOG_NAME, from_line, log_files

FileKey = Tuple[int, int]
HEAD = 64  # bytes that tell two files with the same inode number apart


class _Open:
    def __init__(self, fh: BinaryIO, path: str, key: FileKey) -> None:
        self.fh = fh
        self.path = path
        self.key = key
        self.lines = 0  # complete lines consumed, for file:line in errors
        self.partial = b""


def _key(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino)


class Follower:
    """``poll()`` returns the records appended since the last poll, oldest first.

    ``from_start``: begin with every record already in the log (rotated files first);
    otherwise begin at the current end of the log.
    """

    def __init__(self, log_dir: str, on_error: Callable[[LogFormatError], None],
                 from_start: bool = False, base: str = LOG_NAME) -> None:
        self.log_dir = log_dir
        self.base = base
        self.path = os.path.join(log_dir, base)
        self.on_error = on_error
        self._seen: Dict[FileKey, bytes] = {}  # (dev, ino) -> first bytes when read
        self._cur: Optional[_Open] = None
        if not os.path.isdir(log_dir):
            raise MalformedInput(log_dir, "no such log directory")
        if not from_start:
            self._skip_existing()

    def _skip_existing(self) -> None:
        for path in log_files(self.log_dir, self.base):
            if path == self.path:
                continue
            try:
                with open(path, "rb") as fh:
                    self._seen[_key(os.fstat(fh.fileno()))] = fh.read(HEAD)
            except OSError:
                continue
        cur = self._open(self.path)
        if cur is not None:  # start at its end; count its lines for file:line messages
            for chunk in iter(lambda: cur.fh.read(1 << 20), b""):
                cur.lines += chunk.count(b"\n")
                cur.partial = chunk[chunk.rfind(b"\n") + 1:] if b"\n" in chunk \
                    else cur.partial + chunk
            self._cur = cur

    def _open(self, path: str) -> Optional[_Open]:
        try:
            fh = open(path, "rb")  # noqa: SIM115 (kept open across polls; closed in _retire)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.on_error(LogFormatError(path, f"cannot read: {exc.strerror}"))
            return None
        key = _key(os.fstat(fh.fileno()))
        head = os.pread(fh.fileno(), HEAD, 0)
        current = self._cur is not None and self._cur.key == key
        if current or (head and self._seen.get(key) == head):
            fh.close()
            return None
        self._seen[key] = head
        return _Open(fh, path, key)

    def _read(self, cur: _Open, out: List[LoggedDecision]) -> None:
        if os.fstat(cur.fh.fileno()).st_size < cur.fh.tell():  # cut back in place
            cur.fh.seek(0)
            cur.lines, cur.partial = 0, b""
        data = cur.fh.read()
        if not data:
            return
        lines = (cur.partial + data).split(b"\n")
        cur.partial = lines.pop()  # b"" after a final newline, else a line still growing
        for raw in lines:
            cur.lines += 1
            if not raw.strip():
                continue
            try:
                out.append(from_line(raw, cur.path, cur.lines))
            except LogFormatError as exc:
                self.on_error(exc)

    def _retire(self, cur: _Open, out: List[LoggedDecision]) -> None:
        """Read a rotated-away file to its end; a line left unfinished there is torn."""
        self._read(cur, out)
        if cur.partial.strip():
            self.on_error(LogFormatError(cur.path, f"line {cur.lines + 1}: cut short "
                                         f"(no newline before the file was rotated)"))
        self._seen[cur.key] = os.pread(cur.fh.fileno(), HEAD, 0)  # complete now
        cur.fh.close()

    def poll(self) -> List[LoggedDecision]:
        out: List[LoggedDecision] = []
        if self._cur is not None:
            self._read(self._cur, out)
            try:
                now: Optional[FileKey] = _key(os.stat(self.path))
            except OSError:
                now = None
            if now == self._cur.key:
                return out
            self._retire(self._cur, out)  # rotated (or removed) under us
            self._cur = None
        self._catch_up(out)
        return out

    def _catch_up(self, out: List[LoggedDecision]) -> None:
        """Read every file not read yet, oldest first; keep the current one open.

        Listed again until nothing new turns up: a rotation while the list is walked
        shifts names, and a file could otherwise be skipped (it is then read late, not lost).
        """
        for _ in range(5):
            try:
                paths = log_files(self.log_dir, self.base)
            except MalformedInput as exc:
                self.on_error(LogFormatError(self.log_dir, exc.problem))
                return
            rotated_read = False
            for path in paths:
                opened = self._open(path)
                if opened is None:
                    continue
                if path != self.path:
                    self._retire(opened, out)
                    rotated_read = True
                    continue
                if self._cur is not None:  # rotated again while the list was walked
                    self._retire(self._cur, out)
                    rotated_read = True
                self._cur = opened
                self._read(opened, out)
            if not rotated_read:
                return

    def close(self) -> None:
        if self._cur is not None:
            self._cur.fh.close()
            self._cur = None
