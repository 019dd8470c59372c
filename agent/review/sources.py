"""Where a review reads decision records from: one host's log directory, or a fleet's.

A path given to ``denials --log-dir`` or ``policy whatif --log`` is a decision-log file
(plain or ``.gz``), ``-`` for standard input, or a directory: its own log files (oldest
first, as rotation names them: ``decisions.jsonl.N[.gz]`` … ``.1``, then
``decisions.jsonl``) and, recursively, those of every directory below it, so a collector's
tree (``/srv/logs/<host>/decisions.jsonl*``) reads in one go. The same file named twice is
read once. Reading never stops at a bad line or an unreadable file: each goes to
``on_error`` with its file and line. A rotated file that vanishes while a live log is read
(the agent's rotation deleted the oldest) is skipped, not an error.
"""

from __future__ import annotations

import gzip
import os
import sys
import time
from typing import IO, Callable, Iterator, List, Optional, Sequence, Set, Tuple

from agent.errors import MalformedInput
from agent.record import LogFormatError, LoggedDecision
from agent.record.decision_log import LOG_NAME, from_line, log_files

STDIN = "-"


def log_paths(given: Sequence[str]) -> List[str]:
    """Files to read, in order; raises MalformedInput for a path that holds no log."""
    out: List[str] = []
    seen: Set[Tuple[int, int]] = set()
    for path in given:
        if path == STDIN:
            out.append(STDIN)
            continue
        if os.path.isdir(path):
            names = _tree(path)
            if not names:
                raise MalformedInput(path, f"no {LOG_NAME} (or rotated copies) in this "
                                     f"directory or below it")
        elif os.path.exists(path):
            names = [path]
        else:
            raise MalformedInput(path, "no such file or directory")
        for name in names:
            try:
                st = os.stat(name)
            except FileNotFoundError:
                if name == path:
                    raise MalformedInput(name, "no such file or directory") from None
                continue  # listed in a directory, then rotated away
            except OSError as exc:
                raise MalformedInput(name, f"cannot read: {exc.strerror}") from None
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                out.append(name)
    return out


def _tree(top: str) -> List[str]:
    """Every directory's log files under ``top``, directories in path order."""
    out: List[str] = []
    for directory, subdirs, _files in os.walk(top, onerror=None, followlinks=False):
        subdirs.sort()
        out.extend(log_files(directory, LOG_NAME))
    return out


def _open(path: str) -> IO[bytes]:
    if path == STDIN:
        return sys.stdin.buffer
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def read_records(paths: Sequence[str], on_error: Callable[[LogFormatError], None],
                 progress: Optional[Callable[[int, int, int], None]] = None,
                 needles: Sequence[bytes] = ()) -> Iterator[LoggedDecision]:
    """Every record of the files in order. ``progress(files_done, files, records)`` is
    called now and then (for a terminal's progress line). ``needles``: a line that holds
    none of them is skipped unparsed (a prefilter: what it lets through is still filtered
    on the parsed record, so it may only pass too much, never too little)."""
    count = 0
    for index, path in enumerate(paths):
        label = "<stdin>" if path == STDIN else path
        try:
            fh = _open(path)
        except FileNotFoundError:
            continue  # rotated away since it was listed
        except OSError as exc:
            on_error(LogFormatError(label, f"cannot read: {exc.strerror}"))
            continue
        n = 0
        try:
            for n, raw in enumerate(fh, 1):
                if not raw.strip() or (needles and not any(x in raw for x in needles)):
                    continue
                try:
                    yield from_line(raw, label, n)
                    count += 1
                except LogFormatError as exc:
                    on_error(exc)
                if progress is not None and count % 20000 == 0:
                    progress(index, len(paths), count)
        except (OSError, EOFError) as exc:  # gzip: a truncated member is an EOFError
            on_error(LogFormatError(label, f"cannot read: {exc} (after line {n})"))
        finally:
            if path != STDIN:
                fh.close()
    if progress is not None:
        progress(len(paths), len(paths), count)


class Progress:
    """One line on a terminal's stderr, rewritten at most twice a second; nothing when
    stderr is not a terminal (a pipe, a log) and nothing for a read that ends quickly."""

    def __init__(self, prog: str, stream: IO[str] = sys.stderr) -> None:
        self.prog, self.stream = prog, stream
        self.enabled = stream.isatty()
        self.started = time.monotonic()
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int, files: int, records: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.started < 1.0:
            return
        final = done == files
        if not final and now - self.last < 0.5:
            return
        self.last = now
        rate = records / max(now - self.started, 1e-6)
        self.stream.write(f"\r{self.prog}: {records} records, {done}/{files} files, "
                          f"{rate:,.0f} records/s" + ("\n" if final else ""))
        self.stream.flush()
        self.shown = not final
