"""Find the Go runtime's pclntab in an ELF file: evidence of Go that build info cannot hide.

Where: first the section the Go linker names (``.gopclntab``; ``.data.rel.ro.gopclntab`` in
an internally linked PIE), a hint only, since section headers can be removed or renamed
without changing what runs. Then a scan of every byte that a PT_LOAD maps (each byte once,
however the segments overlap) for a header prefix: a known magic in the file's byte order,
two zero pad bytes, minLC 1, 2 or 4 and ptrSize 4 or 8. Each candidate is validated
(``pclntab.parse``) and cross-checked against a moduledata pointing at it
(``moduledata.find``).

A valid pclntab is enough to call the file Go: the moduledata check only strengthens the
evidence, because an attacker can hide a pointer (a zeroed in-place value, a relocation form
not resolved here) more easily than the table itself, which the runtime checks at start.

Bounded work: reads in 1 MiB windows; at most ``MAX_CANDIDATES`` header-shaped byte runs
(more is an attack on the scan: ``MalformedInput``, which policy reads as Go); moduledata
scans share a budget of twice the file size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from agent.errors import MalformedInput, NotGoBinary
from agent.goinfo import moduledata
from agent.goinfo.elf import Elf, section_addrs
from agent.goinfo.pclntab import MAGICS, NotPclntab, PclnHeader, parse
from agent.goinfo.relocs import Rela, load_rela
from agent.goinfo.source import read_exact

SECTIONS = (b".gopclntab", b".data.rel.ro.gopclntab")
CHUNK = 1 << 20
MAX_CANDIDATES = 1024  # header-shaped byte runs examined; real files have 0 to 2
MAX_VALID = 4  # valid pclntabs without a moduledata before the scan stops
# Little endian: search the magic's three 0xff bytes and what follows (a literal prefix
# keeps the regex fast), then check the byte before. Big endian starts with them.
_LE_TAIL = re.compile(rb"\xff\xff\xff\x00\x00[\x01\x02\x04][\x04\x08]")
_LE_FIRST = frozenset(m & 0xFF for m in MAGICS)
_BE = re.compile(rb"\xff\xff\xff[\xf0\xf1\xfa\xfb]\x00\x00[\x01\x02\x04][\x04\x08]")


class NoGoRuntime(NotGoBinary):
    """No Go runtime tables found in the file (``detail`` says where it looked)."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


@dataclass(frozen=True)
class GoRuntime:
    """Where the Go runtime's tables are: what makes a file Go without its build info."""

    pclntab: int  # address of the pclntab header
    formats: str  # the Go releases whose linker writes this header, e.g. "go1.18-1.19"
    magic: int
    byte_order: str  # "little" or "big"
    ptr_size: int
    min_lc: int
    nfunc: int
    found_by: str  # "section .gopclntab" (or the PIE name) or "scan"
    moduledata: Optional[int]  # a moduledata pointing at the pclntab, when found

    def describe(self) -> str:
        md = (f"moduledata at {self.moduledata:#x} points to it" if self.moduledata is not None
              else "no moduledata found pointing to it")
        return (f"Go runtime pclntab ({self.formats}, {self.nfunc} functions) at "
                f"{self.pclntab:#x}, found by {self.found_by}; {md}")

    def to_json(self) -> Dict[str, Any]:
        return {"pclntab": f"{self.pclntab:#x}", "formats": self.formats,
                "magic": f"{self.magic:#010x}", "byte_order": self.byte_order,
                "ptr_size": self.ptr_size, "min_lc": self.min_lc, "nfunc": self.nfunc,
                "found_by": self.found_by,
                "moduledata": f"{self.moduledata:#x}" if self.moduledata is not None else None}


def _runtime(header: PclnHeader, found_by: str, md: Optional[int]) -> GoRuntime:
    return GoRuntime(header.addr, header.formats, header.magic,
                     "little" if header.order == "<" else "big", header.ptr_size,
                     header.min_lc, header.nfunc, found_by, md)


def _magic_offsets(elf: Elf) -> Iterator[int]:
    """File offsets of header-shaped byte runs in the mapped parts of the file."""
    little = elf.order == "<"
    for start, end in elf.load_ranges():
        pos = start
        while pos < end:
            data = read_exact(elf.src, min(CHUNK + 8, end - pos), pos, "a loadable segment")
            if little:
                for m in _LE_TAIL.finditer(data, 1):
                    head = m.start() - 1
                    if head >= CHUNK:
                        break
                    if data[head] in _LE_FIRST:
                        yield pos + head
            else:
                for m in _BE.finditer(data):
                    if m.start() >= CHUNK:
                        break
                    yield pos + m.start()
            pos += CHUNK


class _Search:
    def __init__(self, elf: Elf) -> None:
        self.elf = elf
        self.budget = moduledata.Budget(2 * elf.src.size + CHUNK)
        self._rela: Optional[Tuple[Optional[Rela]]] = None
        self.problems: List[str] = []

    @property
    def rela(self) -> Optional[Rela]:
        if self._rela is None:
            self._rela = (load_rela(self.elf),)
        return self._rela[0]

    def moduledata(self, header: PclnHeader) -> Optional[int]:
        return moduledata.find(self.elf, header, self.rela, self.budget)

    def by_section(self) -> Optional[GoRuntime]:
        for name, addr in section_addrs(self.elf, SECTIONS).items():
            seg = self.elf.segment_at(addr)
            if seg is None:
                continue
            try:
                # the section names it: a magic of its own (an obfuscator's) is allowed
                header = parse(self.elf, seg, addr, any_magic=True)
            except NotPclntab as exc:
                self.problems.append(f"section {name.decode()}: {exc}")
                continue
            return _runtime(header, f"section {name.decode()}", self.moduledata(header))
        return None

    def by_scan(self) -> Optional[GoRuntime]:
        first: Optional[GoRuntime] = None
        valid = 0
        for count, offset in enumerate(_magic_offsets(self.elf), start=1):
            if count > MAX_CANDIDATES:
                raise MalformedInput(self.elf.src.path, f"more than {MAX_CANDIDATES} "
                                     "pclntab-like headers: refusing to search further")
            where = self.elf.va_of_offset(offset)
            if where is None:
                continue
            try:
                header = parse(self.elf, where[0], where[1])
            except NotPclntab as exc:
                if len(self.problems) < 3:
                    self.problems.append(str(exc))
                continue
            found = _runtime(header, "scan", self.moduledata(header))
            if found.moduledata is not None:
                return found
            first = first or found
            valid += 1
            if valid >= MAX_VALID:
                break
        return first


def locate_runtime(elf: Elf) -> GoRuntime:
    """The Go runtime's pclntab in ``elf``; ``NoGoRuntime`` when there is none.

    Raises ``MalformedInput`` for a file built to exhaust the search, ``InputError`` on I/O
    errors.
    """
    search = _Search(elf)
    found = search.by_section() or search.by_scan()
    if found is not None:
        return found
    why = "; ".join(search.problems[:3])
    raise NoGoRuntime(elf.src.path, "no Go runtime (no valid pclntab in its loadable "
                      "segments" + (f": {why}" if why else "") + ")")
