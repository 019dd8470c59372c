"""How the review verbs treat bad decision-log lines: file:line on stderr, then a count."""

from __future__ import annotations

import sys
from typing import Callable, List, Optional

from agent.record.decision_log import LogFormatError

MAX_WARNINGS = 20  # bad lines shown on stderr before only counting them


class LogProblems:
    """An ``on_error`` for ``read_records``: unreadable files are kept for the caller to
    fail on; a bad line is shown (up to MAX_WARNINGS) and counted, or, when ``strict``
    gives an error type, raised as that error."""

    def __init__(self, prog: str,
                 strict: Optional[Callable[[str], Exception]] = None) -> None:
        self.prog = prog
        self.strict = strict
        self.bad_lines = 0
        self.unreadable: List[str] = []

    def __call__(self, exc: LogFormatError) -> None:
        if exc.problem.startswith("cannot read"):
            self.unreadable.append(str(exc))
            print(f"{self.prog}: error: {exc}", file=sys.stderr)
            return
        if self.strict is not None:
            raise self.strict(f"bad log record: {exc} (without --strict it is skipped)")
        self.bad_lines += 1
        if self.bad_lines <= MAX_WARNINGS:
            print(f"{self.prog}: skipped a bad record: {exc}", file=sys.stderr)

    def finish(self) -> None:
        if self.bad_lines > MAX_WARNINGS:
            print(f"{self.prog}: skipped {self.bad_lines} bad records in all", file=sys.stderr)
