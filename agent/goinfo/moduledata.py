"""The moduledata that points at a pclntab: how the runtime reaches its own tables.

``runtime.firstmoduledata`` is initialized by the linker with pointers into the pclntab, and
the runtime reads the pclntab through it (``moduledataverify1`` first). A pclntab with a
matching moduledata is the one the file's runtime uses, not a Go binary carried as data.
The runtime writes to moduledata, so it lives in a writable segment, and being initialized
data it has bytes in the file.

The first words, as cmd/link's symtab.go writes them (checked on go1.15 to go1.23 builds):

- go1.16 and later: pcHeader, then the slices funcnametab, cutab, filetab, pctab, pclntable
  and ftab as {pointer, len, cap}; each pointer is the header plus its offset, ftab points
  at pclntable, len equals cap, and ftab's len is nfunc + 1.
- go1.5 to go1.15: pclntable {the header, len, cap}, then ftab {header + 8 + ptrSize,
  nfunc + 1, nfunc + 1}.
"""

from __future__ import annotations

import struct
from typing import Iterator, List, Optional, Sequence

from agent.goinfo.elf import Elf
from agent.goinfo.pclntab import GO12, PclnHeader
from agent.goinfo.relocs import Rela
from agent.goinfo.source import read_exact

CHUNK = 1 << 20
MAX_CANDIDATES = 16  # places that hold the pclntab's address, checked as moduledata


class Budget:
    """Bytes of writable segments left to scan, shared by every pclntab candidate."""

    def __init__(self, size: int) -> None:
        self.left = size

    def take(self, n: int) -> bool:
        self.left -= n
        return self.left >= 0


def _in_place(elf: Elf, value: int, ptr_size: int, budget: Budget) -> Iterator[int]:
    """Addresses in writable segments whose file bytes hold ``value`` as a pointer."""
    needle = struct.pack(elf.ptr_format(ptr_size), value)
    for seg in elf.segments:
        if not seg.writable:
            continue
        end = min(seg.offset + seg.filesz, elf.src.size)
        pos = seg.offset
        while pos < end:
            size = min(CHUNK + len(needle) - 1, end - pos)
            if not budget.take(size):
                return
            data = read_exact(elf.src, size, pos, "a writable segment")
            i = data.find(needle)
            while 0 <= i < CHUNK:
                addr = seg.vaddr + (pos - seg.offset) + i
                if addr % ptr_size == 0:
                    yield addr
                i = data.find(needle, i + 1)
            pos += CHUNK


def _words(elf: Elf, addr: int, count: int, ptr_size: int, rela: Optional[Rela]
           ) -> Optional[List[int]]:
    """``count`` pointer-sized words at ``addr`` as the loader leaves them, or None."""
    seg = elf.segment_at(addr)
    if seg is None or not seg.writable or addr + count * ptr_size > elf.file_end(seg):
        return None
    fmt = elf.order + ("I" if ptr_size == 4 else "Q") * count
    words = list(struct.unpack(fmt, elf.read_va(seg, addr, count * ptr_size, "moduledata")))
    if rela is not None:
        for i in range(count):
            loaded = rela.addend_at(addr + i * ptr_size)
            if loaded is not None:
                words[i] = loaded
    return words


def _expected(header: PclnHeader) -> Sequence[Optional[int]]:
    """The first moduledata words for ``header``; None where only len == cap is known."""
    p, n = header.addr, header.nfunc + 1
    if header.layout is GO12:
        return (p, None, None, header.functab, n, n)
    name, cu, files, pc, pcln = (p + o for o in header.offsets)
    return (p, name, None, None, cu, None, None, files, None, None, pc, None, None,
            pcln, None, None, pcln, n, n)


def matches(elf: Elf, header: PclnHeader, addr: int, rela: Optional[Rela]) -> bool:
    """Whether the words at ``addr`` are a moduledata for ``header``."""
    want = _expected(header)
    words = _words(elf, addr, len(want), header.ptr_size, rela)
    if words is None:
        return False
    for i, expect in enumerate(want):
        if expect is not None and words[i] != expect:
            return False
    # the slices' len == cap (pclntable, then ftab for go1.2-1.15; five more since go1.16)
    pairs = [(1, 2)] if header.layout is GO12 else [(i, i + 1) for i in (2, 5, 8, 11, 14)]
    return all(words[a] == words[b] for a, b in pairs)


def find(elf: Elf, header: PclnHeader, rela: Optional[Rela], budget: Budget) -> Optional[int]:
    """The address of a moduledata that points at ``header``, or None."""
    tried = 0
    seen = set()
    candidates: Iterator[int] = _in_place(elf, header.addr, header.ptr_size, budget)
    if rela is not None:
        candidates = _chain(candidates, rela.offsets_with_addend(header.addr))
    for addr in candidates:
        if addr in seen:
            continue
        seen.add(addr)
        tried += 1
        if tried > MAX_CANDIDATES:
            return None
        if matches(elf, header, addr, rela):
            return addr
    return None


def _chain(first: Iterator[int], then: List[int]) -> Iterator[int]:
    yield from first
    yield from then
