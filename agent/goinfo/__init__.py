"""Read the Go build info (``go version -m``) embedded in an ELF binary, safely.

Reads are positional and bounded, through the program headers of the fd the verifier
opened; nothing is mapped, and hostile files raise a clear error instead of hanging.
"""

from __future__ import annotations

from agent.digest import Artifact
from agent.goinfo.buildinfo import read_source
from agent.goinfo.model import BuildInfo, Module, NoGoBuildInfo
from agent.goinfo.source import BytesSource

__all__ = ["BuildInfo", "Module", "NoGoBuildInfo", "parse_bytes", "read_buildinfo"]


def read_buildinfo(artifact: Artifact) -> BuildInfo:
    """The build info of an opened file.

    Raises ``NotGoBinary`` (as ``NoGoBuildInfo``) when the file carries no Go build info,
    which policy must read as "unknown", not as "not Go"; and ``MalformedInput`` when the
    file is truncated or its build info is malformed; ``InputError`` on I/O errors.
    """
    return read_source(artifact)


def parse_bytes(data: bytes, name: str = "<bytes>") -> BuildInfo:
    """The build info of an in-memory file image (for tests and small inputs)."""
    return read_source(BytesSource(data, name))
