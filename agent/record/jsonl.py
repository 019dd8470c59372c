"""The JSON-lines decision log on disk: append, rotate by size, drop and count on a full disk.

Runs on the writer thread only. Every line is written with one ``write(2)``; a short write
(the disk filled up mid-line) is cut back with ``ftruncate`` so the log never holds a torn
line that the next record would glue onto.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import List, Optional

from agent.errors import InputError
from agent.record.decision_log import LOG_NAME, LoggedDecision, rotation_index, to_line
from agent.record.writer import DISK_FULL, ENCODE_ERROR, IO_ERROR, SinkStats

_FULL = (errno.ENOSPC, errno.EDQUOT)


class JsonlSink:
    """Appends decision records to ``<log_dir>/decisions.jsonl``; keeps ``keep`` rotated files
    (``decisions.jsonl.1`` is the newest) once the current one would pass ``max_bytes``."""

    def __init__(
        self, log_dir: str, max_bytes: int = 16 << 20, keep: int = 5, name: str = LOG_NAME
    ) -> None:
        if max_bytes < 1 or keep < 0:
            raise ValueError(f"log rotation needs max_bytes >= 1 and keep >= 0, "
                             f"not {max_bytes} and {keep}")
        self.log_dir = log_dir
        self.path = os.path.join(log_dir, name)
        self.max_bytes = max_bytes
        self.keep = keep
        self._fd: Optional[int] = None
        self._size = 0
        try:
            os.makedirs(log_dir, mode=0o750, exist_ok=True)
            self._open()
        except OSError as exc:
            raise InputError(self.path, f"cannot open the decision log: {exc.strerror}") from None

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o600)
        self._fd = fd
        self._size = os.fstat(fd).st_size

    def _ensure_open(self) -> int:
        if self._fd is None:
            self._open()
        assert self._fd is not None
        return self._fd

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.keep == 0:
            os.unlink(self.path)
        else:
            for i in range(self.keep - 1, 0, -1):
                older = f"{self.path}.{i}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._drop_beyond_keep()
        self._open()

    def _drop_beyond_keep(self) -> None:
        """Rotated files numbered past ``keep``: left by a run with a larger --log-keep."""
        base = os.path.basename(self.path)
        with contextlib.suppress(OSError):
            for name in os.listdir(self.log_dir):
                n = rotation_index(name, base)  # the agent's own rotations: not .gz ones
                if n is not None and n > self.keep and not name.endswith(".gz"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.log_dir, name))

    def _append(self, line: bytes) -> None:
        fd = self._ensure_open()
        if self._size > 0 and self._size + len(line) > self.max_bytes:
            self._rotate()
            fd = self._ensure_open()
        try:
            n = os.write(fd, line)
        except OSError:
            self._cut_back(fd)
            raise
        if n != len(line):
            self._cut_back(fd)
            raise OSError(errno.ENOSPC,
                          f"{os.strerror(errno.ENOSPC)} (wrote {n} of {len(line)} bytes)")
        self._size += n

    def _cut_back(self, fd: int) -> None:
        with contextlib.suppress(OSError):  # failing that, the reader skips a torn line
            os.ftruncate(fd, self._size)

    def write_batch(self, items: List[LoggedDecision], stats: SinkStats) -> None:
        for item in items:
            try:
                line = to_line(item.id, item.decision)
            except (TypeError, ValueError) as exc:
                stats.dropped(ENCODE_ERROR, 1, f"{item.id}: {exc}")
                continue
            try:
                self._append(line)
            except OSError as exc:
                cause = DISK_FULL if exc.errno in _FULL else IO_ERROR
                stats.dropped(cause, 1, f"{self.path}: {exc.strerror or exc}")
                if cause == IO_ERROR:
                    self._reset()
                continue
            stats.wrote()

    def _reset(self) -> None:
        """Forget the fd after an unexpected error, so the next record reopens the file."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass  # full disk: what was written is in the page cache already
            finally:
                os.close(self._fd)
                self._fd = None
