"""The Go runtime's pclntab: parse one candidate header and check the tables behind it.

The runtime cannot start without its pclntab. ``runtime.moduledataverify1`` compares the
header's magic, pad bytes, minLC and ptrSize with its own build and throws "invalid function
symbol table" otherwise, and every stack walk, GC scan and traceback reads the function
table. So a valid pclntab is evidence that a file runs Go code, whatever its build info says.

Validation is structural, so that random bytes and stray magics do not count: the counts
and offsets in the header must fit the segment, the function table must be sorted, and each
sampled function record (``_func``) must begin with the same entry as its function-table
slot and lie after the table. Layouts (debug/gosym, cmd/link pcln.go, docs/goinfo.md):

- go1.2-1.15 (magic 0xfffffffb): nfunc, then the function table right after the header,
  {entry, funcoff} pointer-sized pairs; funcoff counts from the header.
- go1.16-1.17 (0xfffffffa): nfunc, nfiles, then five table offsets; the function table
  starts the last table (pclntable) and funcoff counts from it.
- go1.18-1.19 (0xfffffff0) and go1.20+ (0xfffffff1): as 1.16 with textStart after nfiles;
  function-table fields are uint32 offsets from the start of the text.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

from agent.goinfo.elf import Elf, Segment

MAX_NFUNC = 1 << 24  # the largest real binaries have a few hundred thousand functions
SAMPLE = 16  # function-table slots checked at each end of the table
PREFIX = 8  # magic (4), two pad bytes, minLC, ptrSize


class NotPclntab(ValueError):
    """The bytes at a candidate address are not a usable pclntab (the message says why)."""


@dataclass(frozen=True)
class Layout:
    name: str
    words: int  # pointer-sized header words after the 8-byte prefix
    first_offset: int  # index of the first table offset among those words (0: none)
    entry32: bool  # function-table fields are uint32 (1.18+), else pointer-sized


GO12 = Layout("go1.2-1.15", 1, 0, False)
GO116 = Layout("go1.16-1.17", 7, 2, False)
GO118 = Layout("go1.18+", 8, 3, True)
MAGICS: Dict[int, Tuple[str, Layout]] = {
    0xFFFFFFFB: ("go1.2-1.15", GO12),
    0xFFFFFFFA: ("go1.16-1.17", GO116),
    0xFFFFFFF0: ("go1.18-1.19", GO118),
    0xFFFFFFF1: ("go1.20+", GO118),
}
# For a header found by section name whose magic is not one of the above (an obfuscator
# that patched both the linker and the runtime): try every layout, newest first.
ANY_LAYOUT = (GO118, GO116, GO12)


@dataclass(frozen=True)
class PclnHeader:
    addr: int  # VA of the header
    magic: int
    layout: Layout
    order: str  # struct byte-order prefix
    min_lc: int
    ptr_size: int
    nfunc: int
    offsets: Tuple[int, ...]  # 1.16+: funcname, cu, filetab, pctab, pcln offsets from addr
    functab: int  # VA of the function table
    funcdata: int  # VA that the function table's funcoff fields count from

    @property
    def formats(self) -> str:
        """Which Go releases write this header, e.g. ``go1.18-1.19``."""
        known = MAGICS.get(self.magic)
        if known is not None:
            return known[0]
        return f"unknown magic {self.magic:#010x}, {self.layout.name} layout"


def parse(elf: Elf, seg: Segment, addr: int, any_magic: bool = False) -> PclnHeader:
    """The validated header at ``addr`` (inside ``seg``); ``NotPclntab`` if it is not one.

    A known magic picks the layout. With ``any_magic`` (the section name already says what
    this is) an unknown magic is allowed and every layout is tried, newest first.
    """
    end = elf.file_end(seg)
    if addr < seg.vaddr or addr + PREFIX > end:
        raise NotPclntab(f"no room for a pclntab header at {addr:#x}")
    raw = elf.read_va(seg, addr, PREFIX, "pclntab header")
    magic = struct.unpack_from(elf.order + "I", raw)[0]
    if raw[4] or raw[5] or raw[6] not in (1, 2, 4) or raw[7] not in (4, 8):
        raise NotPclntab(f"pclntab header at {addr:#x}: pad, minLC or ptrSize are wrong")
    known = MAGICS.get(magic)
    if known is None and not any_magic:
        raise NotPclntab(f"pclntab header at {addr:#x}: unknown magic {magic:#010x}")
    layouts = (known[1],) if known is not None else ANY_LAYOUT
    problems: List[str] = []
    for layout in layouts:
        try:
            return _parse_layout(elf, seg, addr, magic, layout, raw[6], raw[7])
        except NotPclntab as exc:
            problems.append(str(exc))
    raise NotPclntab("; ".join(problems))


def _parse_layout(elf: Elf, seg: Segment, addr: int, magic: int, layout: Layout,
                  min_lc: int, ptr_size: int) -> PclnHeader:
    end = elf.file_end(seg)
    size = PREFIX + layout.words * ptr_size
    if addr + size > end:
        raise NotPclntab(f"pclntab header at {addr:#x} runs past its segment")
    fmt = elf.order + ("I" if ptr_size == 4 else "Q") * layout.words
    words = struct.unpack(fmt, elf.read_va(seg, addr + PREFIX, size - PREFIX, "pclntab header"))
    nfunc = words[0]
    if not 1 <= nfunc <= MAX_NFUNC:
        raise NotPclntab(f"pclntab at {addr:#x}: {nfunc} functions is implausible")
    offsets = tuple(words[layout.first_offset:]) if layout.first_offset else ()
    for off in offsets:
        if not size <= off < end - addr:
            raise NotPclntab(f"pclntab at {addr:#x}: table offset {off:#x} is outside "
                             f"its segment")
    if offsets:
        functab = funcdata = addr + offsets[-1]
    else:
        functab, funcdata = addr + size, addr
    header = PclnHeader(addr, magic, layout, elf.order, min_lc, ptr_size, nfunc, offsets,
                        functab, funcdata)
    _check_functab(elf, seg, header)
    return header


def _field(header: PclnHeader) -> int:
    return 4 if header.layout.entry32 else header.ptr_size


def table_bytes(header: PclnHeader) -> int:
    """Bytes of the function table: nfunc {entry, funcoff} pairs and the end entry."""
    field = _field(header)
    return header.nfunc * 2 * field + field


def _slots(elf: Elf, seg: Segment, header: PclnHeader, first: int, count: int
           ) -> List[Tuple[int, int]]:
    """``count`` (entry, funcoff) slots from index ``first``; the end entry has funcoff -1."""
    field = _field(header)
    fmt = elf.order + ("I" if field == 4 else "Q")
    start = header.functab + first * 2 * field
    last_is_end = first + count > header.nfunc
    size = (count - 1) * 2 * field + field if last_is_end else count * 2 * field
    raw = elf.read_va(seg, start, size, "function table")
    values = [v[0] for v in struct.iter_unpack(fmt, raw)]
    out = [(values[i], values[i + 1]) for i in range(0, len(values) - 1, 2)]
    if last_is_end:
        out.append((values[-1], -1))
    return out


def _indices(nfunc: int) -> Iterator[Tuple[int, int]]:
    """(first index, count) of the sampled runs: the table's head and its tail (end entry
    included), or the whole table when it is small."""
    if nfunc + 1 <= 2 * SAMPLE:
        yield 0, nfunc + 1
        return
    yield 0, SAMPLE
    yield nfunc + 1 - SAMPLE, SAMPLE


def _check_functab(elf: Elf, seg: Segment, header: PclnHeader) -> None:
    end = elf.file_end(seg)
    where = f"pclntab at {header.addr:#x}"
    if header.functab + table_bytes(header) > end:
        raise NotPclntab(f"{where}: function table of {header.nfunc} entries runs past its "
                         f"segment")
    field = _field(header)
    fmt = elf.order + ("I" if field == 4 else "Q")
    # a _func record comes after the whole function table, and must fit the segment
    lowest = header.functab - header.funcdata + table_bytes(header)
    previous: Optional[int] = None
    for first, count in _indices(header.nfunc):
        for entry, funcoff in _slots(elf, seg, header, first, count):
            if previous is not None and entry < previous:
                raise NotPclntab(f"{where}: function table is not sorted")
            previous = entry
            if funcoff < 0:
                continue  # the end entry has no record
            record = header.funcdata + funcoff
            if funcoff < lowest or record + field > end:
                raise NotPclntab(f"{where}: function record offset {funcoff:#x} is outside "
                                 f"its table")
            got = struct.unpack(fmt, elf.read_va(seg, record, field, "function record"))[0]
            if got != entry:
                raise NotPclntab(f"{where}: function record at {record:#x} starts with "
                                 f"{got:#x}, its table slot says {entry:#x}")
