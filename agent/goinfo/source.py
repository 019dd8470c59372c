"""Bounded positional reads over an opened file (an Artifact) or an in-memory buffer."""

from __future__ import annotations

from typing import Protocol

from agent.errors import MalformedInput

# No single read is ever larger than this (the modinfo cap plus its framing).
MAX_READ = (16 << 20) + 64


class Source(Protocol):
    """What the parser needs: a name, a size fixed at open time, and positional reads."""

    path: str
    size: int

    def pread(self, size: int, offset: int) -> bytes: ...


class BytesSource:
    """A Source over bytes, for tests and for callers that already hold the content."""

    def __init__(self, data: bytes, path: str = "<bytes>") -> None:
        self._data = data
        self.path = path
        self.size = len(data)

    def pread(self, size: int, offset: int) -> bytes:
        return self._data[offset : offset + size]


def read_exact(src: Source, size: int, offset: int, what: str) -> bytes:
    """Read exactly ``size`` bytes that the caller has already checked lie inside the file."""
    if size < 0 or offset < 0 or size > MAX_READ:
        raise MalformedInput(src.path, f"refusing a {size}-byte read of {what}")
    if size == 0:
        return b""
    data = src.pread(size, offset)
    if len(data) != size:
        raise MalformedInput(src.path, f"file changed or truncated while reading {what}")
    return data
