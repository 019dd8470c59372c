"""Is a file Go, and how is that known: its build info, else the Go runtime's own tables.

Build info is optional to the runtime: zeroing its magic, or the whole ``.go.buildinfo``
section, changes nothing about what runs. The pclntab is not optional (``runtime.py``). So
a file is Go when either is found, and ``established_by`` says which:

- ``build-info``: the build info was read (still only the builder's claim until the
  signature over the file is verified).
- ``runtime``: no readable build info, but a valid Go runtime pclntab: Go, with nothing
  provable about how it was built.
- ``malformed``: the ELF header, the build info or the runtime search is broken or hostile:
  counted as Go so that Go rules apply and fail closed.
- None: neither: not Go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from agent.errors import MalformedInput, NotGoBinary
from agent.goinfo.buildinfo import read_elf
from agent.goinfo.elf import parse_elf
from agent.goinfo.model import BuildInfo
from agent.goinfo.runtime import GoRuntime, locate_runtime
from agent.goinfo.source import Source

BUILD_INFO, RUNTIME, MALFORMED = "build-info", "runtime", "malformed"


@dataclass(frozen=True)
class GoEvidence:
    path: str
    established_by: Optional[str] = None  # BUILD_INFO, RUNTIME, MALFORMED; None: not Go
    detail: str = ""  # for people: why Go (or not), what is missing or broken
    buildinfo: Optional[BuildInfo] = None
    runtime: Optional[GoRuntime] = None

    @property
    def is_go(self) -> bool:
        return self.established_by is not None


def inspect_source(src: Source, runtime_always: bool = False) -> GoEvidence:
    """The Go evidence of a file. The runtime is searched only when the build info is not
    readable, unless ``runtime_always``. Raises ``InputError`` on I/O errors only."""
    path = src.path
    try:
        elf = parse_elf(src)
    except NotGoBinary as exc:  # not ELF, or nothing mapped: the kernel cannot run Go
        return GoEvidence(path, detail=getattr(exc, "detail", str(exc)))
    except MalformedInput as exc:
        return GoEvidence(path, MALFORMED, f"malformed ELF file: {exc.problem}")
    info: Optional[BuildInfo] = None
    try:
        info = read_elf(elf)
        missing, broken = "", ""
    except NotGoBinary as exc:
        missing, broken = getattr(exc, "detail", str(exc)), ""
    except MalformedInput as exc:
        missing, broken = "", exc.problem
    if info is not None and not runtime_always:
        return GoEvidence(path, BUILD_INFO, "Go build info", info)
    runtime: Optional[GoRuntime] = None
    try:
        runtime = locate_runtime(elf)
        found = runtime.describe()
        hostile = ""
    except NotGoBinary as exc:
        found, hostile = getattr(exc, "detail", str(exc)), ""
    except MalformedInput as exc:
        found, hostile = "", exc.problem
    if info is not None:
        return GoEvidence(path, BUILD_INFO, f"Go build info; {found}", info, runtime)
    if broken:
        return GoEvidence(path, MALFORMED, f"Go build info is malformed: {broken}; "
                          f"{found or 'Go runtime search failed: ' + hostile}", None, runtime)
    if runtime is not None:
        return GoEvidence(path, RUNTIME, f"{missing}; {found}", None, runtime)
    if hostile:
        return GoEvidence(path, MALFORMED, f"{missing}; Go runtime search failed: {hostile}")
    return GoEvidence(path, None, f"{missing} and {found}")
