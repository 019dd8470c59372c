"""Path and module globs: ``*`` and ``?`` stay inside one segment, ``**`` spans segments.

A glob that matches a directory also matches everything below it (as in gitignore), so
``/opt/app`` and ``/opt/app/**`` mean the same and a CLI ``--scope DIR`` needs no stars.
Patterns are compiled once, at policy load; a malformed one is a load error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Pattern

_META = frozenset("*?[")


class GlobError(ValueError):
    """The pattern is not a valid glob; the message says why."""


def _class(seg: str, start: int) -> tuple[str, int]:
    """Translate ``[...]`` starting at ``seg[start]``; returns (regex, index after ``]``)."""
    i = start + 1
    negate = i < len(seg) and seg[i] in "!^"
    if negate:
        i += 1
    body_start = i
    if i < len(seg) and seg[i] == "]":  # a leading ']' is a literal member
        i += 1
    while i < len(seg) and seg[i] != "]":
        i += 1
    if i >= len(seg):
        raise GlobError(f"unterminated '[' in {seg!r}")
    body = seg[body_start:i]
    if not body:
        raise GlobError(f"empty character class in {seg!r}")
    escaped = "".join("\\" + c if c in "\\^]" else c for c in body)
    # A range such as [+-0] spans '/', which must never match inside a segment.
    return ("[^/" + escaped + "]" if negate else "(?!/)[" + escaped + "]"), i + 1


def _segment(seg: str) -> str:
    out: List[str] = []
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            if seg.startswith("**", i):
                raise GlobError("'**' must be a whole path segment, as in a/**/b")
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            regex, i = _class(seg, i)
            out.append(regex)
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class Glob:
    """A compiled glob. ``absolute`` globs match file paths, the others Go module paths."""

    pattern: str
    absolute: bool
    _regex: Pattern[str] = field(repr=False, compare=False)

    @classmethod
    def compile(cls, pattern: str, absolute: bool = True) -> Glob:
        if not pattern:
            raise GlobError("empty pattern")
        if "\x00" in pattern:
            raise GlobError("NUL byte in pattern")
        if absolute and not pattern.startswith("/"):
            raise GlobError(f"{pattern!r} is not an absolute path glob")
        if not absolute and pattern.startswith("/"):
            raise GlobError(f"{pattern!r}: a module path glob does not start with '/'")
        body = pattern.rstrip("/") if pattern != "/" else ""
        if not absolute:
            body = "/" + body
        segments = body.split("/")[1:] if body else []
        parts: List[str] = []
        for seg in segments:
            if seg in ("", ".", ".."):
                raise GlobError(f"{pattern!r} has an empty, '.' or '..' segment")
            parts.append("(?:/[^/]*)*" if seg == "**" else "/" + _segment(seg))
        # The trailing group is the "and everything below it" rule.
        regex = re.compile("(?s:" + "".join(parts) + ")(?:/.*)?")
        return cls(pattern, absolute, regex)

    def matches(self, value: str) -> bool:
        subject = value if self.absolute else "/" + value
        return self._regex.fullmatch(subject) is not None

    def root(self) -> str:
        """The directory every match lies under: the segments before the first wildcard."""
        fixed: List[str] = []
        for seg in self.pattern.strip("/").split("/"):
            if not seg or _META.intersection(seg):
                break
            fixed.append(seg)
        return "/" + "/".join(fixed) if self.absolute else "/".join(fixed)
