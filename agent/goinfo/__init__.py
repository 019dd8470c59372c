"""Go facts about an ELF binary, read safely: its build info (``go version -m``), and the Go
runtime's own tables (pclntab, moduledata), which say "Go" even without build info.

Reads are positional and bounded, through the program headers of the fd the verifier
opened; nothing is mapped, and hostile files raise a clear error instead of hanging.
"""

from __future__ import annotations

from agent.digest import Artifact
from agent.goinfo.buildinfo import read_source
from agent.goinfo.evidence import BUILD_INFO, MALFORMED, RUNTIME, GoEvidence, inspect_source
from agent.goinfo.model import BuildInfo, Module, NoGoBuildInfo
from agent.goinfo.runtime import GoRuntime, NoGoRuntime
from agent.goinfo.source import BytesSource

__all__ = [
    "BUILD_INFO",
    "MALFORMED",
    "RUNTIME",
    "BuildInfo",
    "GoEvidence",
    "GoRuntime",
    "Module",
    "NoGoBuildInfo",
    "NoGoRuntime",
    "inspect_bytes",
    "inspect_go",
    "parse_bytes",
    "read_buildinfo",
]


def read_buildinfo(artifact: Artifact) -> BuildInfo:
    """The build info of an opened file.

    Raises ``NotGoBinary`` (as ``NoGoBuildInfo``) when the file carries no Go build info,
    which is not proof that it is not Go (see ``inspect_go``); ``MalformedInput`` when the
    file is truncated or its build info is malformed; ``InputError`` on I/O errors.
    """
    return read_source(artifact)


def inspect_go(artifact: Artifact, runtime_always: bool = False) -> GoEvidence:
    """Whether an opened file is Go, and how that is known (build info, or the Go runtime's
    pclntab when the build info is missing or broken). Raises ``InputError`` on I/O errors."""
    return inspect_source(artifact, runtime_always)


def parse_bytes(data: bytes, name: str = "<bytes>") -> BuildInfo:
    """The build info of an in-memory file image (for tests and small inputs)."""
    return read_source(BytesSource(data, name))


def inspect_bytes(data: bytes, name: str = "<bytes>", runtime_always: bool = False
                  ) -> GoEvidence:
    """``inspect_go`` of an in-memory file image (for tests and small inputs)."""
    return inspect_source(BytesSource(data, name), runtime_always)
