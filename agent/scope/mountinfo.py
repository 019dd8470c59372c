"""The mount table as the kernel shows it in ``/proc/<pid>/mountinfo`` (proc(5)): pure parsing.

Each line: mount id, parent id, major:minor, the root of the mount *within its filesystem*,
the mount point in the reader's namespace, per-mount options, optional fields, ``-``, the
filesystem type, the source, and the super-block options. The root field is what makes a bind
mount visible: ``/opt/app`` bound onto ``/srv/x`` shows root ``/opt/app`` at point ``/srv/x``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    dev: int  # as stat() reports it: os.makedev(major, minor)
    root: str  # the directory of the filesystem this mount shows
    point: str  # where it is mounted, in the namespace of the reader
    fstype: str
    source: str
    options: str  # per-mount options (ro, noexec, ...)
    super_options: str  # per-filesystem options (overlay layers live here)

    @property
    def noexec(self) -> bool:
        return "noexec" in self.options.split(",")


def unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo (octal)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_line(line: str) -> Optional[Mount]:
    """One mountinfo line, or None when it is not one (a truncated read)."""
    left, sep, right = line.rstrip("\n").partition(" - ")
    fields = left.split(" ")
    tail = right.split(" ")
    if not sep or len(fields) < 6 or len(tail) < 3:
        return None
    try:
        major, minor = (int(x) for x in fields[2].split(":"))
        return Mount(int(fields[0]), int(fields[1]), os.makedev(major, minor),
                     unescape(fields[3]), unescape(fields[4]), tail[0], unescape(tail[1]),
                     fields[5], unescape(" ".join(tail[2:])))
    except ValueError:
        return None


def parse(text: str) -> List[Mount]:
    return [m for m in (parse_line(line) for line in text.splitlines()) if m is not None]


def read(path: str = MOUNTINFO) -> List[Mount]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse(f.read())


def under(path: str, root: str) -> bool:
    """``path`` is ``root`` or below it (both absolute and normalized)."""
    return root == "/" or path == root or path.startswith(root + "/")


def join(base: str, rest: str) -> str:
    """``base`` + the relative ``rest`` ("" or "/..."), normalized without touching disk."""
    out = base.rstrip("/") + rest if rest else base
    return out or "/"


def holder(mounts: List[Mount], path: str) -> Optional[Mount]:
    """The mount that shows ``path`` (the last-mounted of the longest mount points above it),
    from the table alone: symlinks in ``path`` are the caller's to resolve."""
    best: Optional[Mount] = None
    for m in mounts:  # mountinfo lists mounts in mount order: a later one covers an earlier
        if under(path, m.point) and (best is None or len(m.point) >= len(best.point)):
            best = m
    return best


def fs_relative(mounts: List[Mount], path: str) -> Optional[Tuple[int, str]]:
    """(dev, path within that filesystem) of an absolute, resolved ``path``."""
    m = holder(mounts, path)
    if m is None:
        return None
    rest = path if m.point == "/" else path[len(m.point):]  # "" or "/..."
    return m.dev, join(m.root, rest)


def overlay_layers(super_options: str) -> Optional[List[str]]:
    """The layer directories of an overlay mount (lowerdir, upperdir), or None when the
    options cannot be read with certainty (the caller then fails closed)."""
    opts: List[str] = []
    cur, i = "", 0
    while i < len(super_options):  # split on unescaped commas
        c = super_options[i]
        if c == "\\" and i + 1 < len(super_options):
            cur += super_options[i : i + 2]
            i += 2
            continue
        if c == ",":
            opts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    opts.append(cur)
    layers: List[str] = []
    for opt in opts:
        key, _, value = opt.partition("=")
        if key in ("lowerdir", "lowerdir+", "upperdir", "datadir+"):
            parts = [p.replace("\\:", ":").replace("\\,", ",") for p in _split_colons(value)]
            if not parts or any(not p.startswith("/") for p in parts):
                return None
            layers.extend(os.path.normpath(p) for p in parts)
    return layers or None


def _split_colons(value: str) -> List[str]:
    out, cur, i = [], "", 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            cur += value[i : i + 2]
            i += 2
            continue
        if value[i] == ":":
            out.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    out.append(cur)
    return [p for p in out if p]
