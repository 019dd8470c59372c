"""Dynamic RELA relocations without a symbol: what a pointer in a PIE holds once loaded.

In a position-independent executable every pointer in initialized data is relocated when
the file is loaded. The Go linker and GNU ld also write the link-time value in place, but
with RELA relocations the loader takes the value from the relocation's addend and ignores
the bytes in the file: lld leaves them zero, and anyone can zero them without changing what
runs. So a pointer that reads as zero is looked up here before it is believed.

Only relocations without a symbol (r_sym 0: RELATIVE on every architecture) are used; their
value is base + addend, and the base is 0 in the file's own address space. The table comes
from PT_DYNAMIC (DT_RELA, DT_RELASZ, DT_RELAENT), so section headers are not needed.
"""

from __future__ import annotations

import struct
from typing import Dict, List, Optional

from agent.errors import MalformedInput
from agent.goinfo.elf import PT_DYNAMIC, Elf

DT_NULL, DT_RELA, DT_RELASZ, DT_RELAENT = 0, 7, 8, 9
MAX_DYNAMIC = 4096  # entries of the dynamic table read (real files have about 30)
MAX_TABLE = 16 << 20  # a larger RELA table is not read: the evidence just gets weaker


class Rela:
    """The file's RELA table, held in memory (bounded) and searched with ``bytes.find``."""

    def __init__(self, elf: Elf, table: bytes) -> None:
        self.elf = elf
        self.table = table
        self.bits = elf.bits
        self.entsize = 24 if elf.bits == 64 else 12
        self.word = elf.order + ("Q" if elf.bits == 64 else "I")

    def _symless(self, pos: int) -> bool:
        info = int(struct.unpack_from(self.word, self.table, pos + self.entsize // 3)[0])
        sym = info >> 32 if self.bits == 64 else info >> 8
        kind = info & (0xFFFFFFFF if self.bits == 64 else 0xFF)
        return sym == 0 and kind != 0

    def _hits(self, value: int, field: int) -> List[int]:
        """Entry positions whose field number ``field`` (0 offset, 2 addend) is ``value``."""
        mask = (1 << self.bits) - 1
        needle = struct.pack(self.word, value & mask)
        at = field * self.entsize // 3
        out: List[int] = []
        i = self.table.find(needle)
        while i >= 0:
            if (i - at) % self.entsize == 0 and self._symless(i - at):
                out.append(i - at)
            i = self.table.find(needle, i + 1)
        return out

    def addend_at(self, addr: int) -> Optional[int]:
        """The loaded value of the pointer at ``addr``, when a RELATIVE relocation sets it."""
        hits = self._hits(addr, 0)
        if not hits:
            return None
        return int(struct.unpack_from(self.word, self.table, hits[0] + 2 * self.entsize // 3)[0])

    def offsets_with_addend(self, value: int) -> List[int]:
        """Addresses that the loader fills with ``value``."""
        return [int(struct.unpack_from(self.word, self.table, pos)[0])
                for pos in self._hits(value, 2)]


def load_rela(elf: Elf) -> Optional[Rela]:
    """The RELA table named by PT_DYNAMIC, or None (static file, REL, unreadable, too big)."""
    dyn = next((s for s in elf.segments if s.type == PT_DYNAMIC), None)
    if dyn is None:
        return None
    word = elf.order + ("Q" if elf.bits == 64 else "I")
    size = struct.calcsize(word)
    count = min(dyn.filesz // (2 * size), MAX_DYNAMIC)
    if count == 0 or dyn.offset + count * 2 * size > elf.src.size:
        return None
    raw = elf.src.pread(count * 2 * size, dyn.offset)
    tags: Dict[int, int] = {}
    for i in range(len(raw) // (2 * size)):
        tag, val = struct.unpack_from(word + word[1:], raw, i * 2 * size)
        if tag == DT_NULL:
            break
        tags.setdefault(tag, val)
    addr, length = tags.get(DT_RELA), tags.get(DT_RELASZ, 0)
    entsize = 24 if elf.bits == 64 else 12
    if addr is None or tags.get(DT_RELAENT, entsize) != entsize or not 0 < length <= MAX_TABLE:
        return None
    seg = elf.segment_at(addr)
    if seg is None:
        return None
    try:
        return Rela(elf, elf.read_va(seg, addr, length - length % entsize, "RELA table"))
    except MalformedInput:
        return None  # a truncated table: no relocation evidence, not an error
