"""The parts of ELF the build-info reader needs: header, program headers, one section address.

Only program headers are trusted to say where bytes live; section headers are a hint and
are ignored when they look wrong.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, List, Tuple

from agent.errors import MalformedInput
from agent.goinfo.model import NoGoBuildInfo
from agent.goinfo.source import Source, read_exact

ELF_MAGIC = b"\x7fELF"
PT_LOAD = 1
PT_DYNAMIC = 2
PF_X, PF_W = 1, 2
PN_XNUM = 0xFFFF
SHN_LORESERVE = 0xFF00
MAX_PHNUM = 4096  # real binaries have about 10; this bounds the table read
MAX_SHSTRTAB = 1 << 20

# (header struct after e_ident, phdr struct, phdr size, shdr struct, shdr size), per class
_LAYOUT = {
    1: ("HHIIIIIHHHHHH", "IIIIIIII", 32, "IIIIIIIIII", 40),
    2: ("HHIQQQIHHHHHH", "IIQQQQQQ", 56, "IIQQQQIIQQ", 64),
}


@dataclass(frozen=True)
class Segment:
    index: int
    type: int
    flags: int
    offset: int
    vaddr: int
    filesz: int
    memsz: int

    @property
    def writable_data(self) -> bool:
        return self.type == PT_LOAD and bool(self.flags & PF_W) and not self.flags & PF_X

    @property
    def writable(self) -> bool:
        return self.type == PT_LOAD and bool(self.flags & PF_W)


@dataclass(frozen=True)
class Elf:
    src: Source
    bits: int
    order: str  # struct byte-order prefix: "<" or ">"
    segments: Tuple[Segment, ...]
    shoff: int
    shnum: int
    shentsize: int
    shstrndx: int

    def file_end(self, seg: Segment) -> int:
        """The VA just past the segment's bytes that are present in the file."""
        if seg.offset >= self.src.size:
            return seg.vaddr
        return seg.vaddr + min(seg.filesz, self.src.size - seg.offset)

    def clipped(self, seg: Segment) -> bool:
        return seg.offset + seg.filesz > self.src.size

    def segment_at(self, addr: int) -> Segment | None:
        """The first PT_LOAD whose file bytes contain ``addr`` (as Go's reader picks)."""
        for seg in self.segments:
            if seg.type == PT_LOAD and seg.vaddr <= addr < seg.vaddr + seg.filesz:
                return seg
        return None

    def zero_filled(self, addr: int, size: int) -> bool:
        """``addr``..``addr+size`` lies in a PT_LOAD segment's memory past its file bytes
        (.bss: zeros when the program runs), and in no segment's file bytes."""
        if self.segment_at(addr) is not None:
            return False
        return any(seg.type == PT_LOAD and seg.vaddr + seg.filesz <= addr
                   and addr + size <= seg.vaddr + seg.memsz for seg in self.segments)

    def ptr_format(self, ptr_size: int) -> str:
        """The struct format of one pointer-sized word in this file's byte order."""
        return self.order + ("I" if ptr_size == 4 else "Q")

    def load_ranges(self) -> Tuple[Tuple[int, int], ...]:
        """The file byte ranges [start, end) that PT_LOAD segments map, merged and clipped
        to the file: scanning these touches each byte once, however segments overlap."""
        spans = sorted((s.offset, min(s.offset + s.filesz, self.src.size))
                       for s in self.segments if s.type == PT_LOAD and s.filesz > 0)
        merged: List[Tuple[int, int]] = []
        for start, end in spans:
            if start >= end:
                continue
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return tuple(merged)

    def va_of_offset(self, offset: int) -> Tuple[Segment, int] | None:
        """The first PT_LOAD that maps file ``offset``, and the address it maps it to."""
        for seg in self.segments:
            if seg.type == PT_LOAD and seg.offset <= offset < seg.offset + seg.filesz:
                return seg, seg.vaddr + (offset - seg.offset)
        return None

    def read_va(self, seg: Segment, addr: int, size: int, what: str) -> bytes:
        """Read ``size`` bytes at ``addr``, all inside ``seg``'s file bytes."""
        if addr < seg.vaddr or addr + size > seg.vaddr + seg.filesz:
            raise MalformedInput(self.src.path, f"{what} at {addr:#x} runs past its segment")
        if addr + size > self.file_end(seg):
            raise MalformedInput(self.src.path, f"truncated: {what} at {addr:#x} is past EOF")
        return read_exact(self.src, size, seg.offset + (addr - seg.vaddr), what)


def parse_elf(src: Source) -> Elf:
    """Validate the ELF header and read the program headers (bounded by the file size)."""
    path = src.path
    ident = src.pread(16, 0)
    if ident[:4] != ELF_MAGIC:
        raise NoGoBuildInfo(path, "not an ELF file (no Go build info)")
    if len(ident) < 16:
        raise MalformedInput(path, "truncated ELF header")
    bits_code, data_code, version = ident[4], ident[5], ident[6]
    if bits_code not in (1, 2) or data_code not in (1, 2) or version != 1:
        raise MalformedInput(path, "ELF header has an unknown class, byte order or version")
    order = "<" if data_code == 1 else ">"
    hdr_fmt, ph_fmt, ph_size, _, _ = _LAYOUT[bits_code]
    hdr_len = struct.calcsize(order + hdr_fmt)
    raw = src.pread(hdr_len, 16)
    if len(raw) != hdr_len:
        raise MalformedInput(path, "truncated ELF header")
    (_, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, shstrndx) = struct.unpack(
        order + hdr_fmt, raw
    )
    if phnum == 0:
        raise NoGoBuildInfo(path, "ELF file has no program headers (no Go build info)")
    if phnum == PN_XNUM or phnum > MAX_PHNUM:
        raise MalformedInput(path, f"e_phnum {phnum} is over the limit of {MAX_PHNUM}")
    if phentsize != ph_size:
        raise MalformedInput(path, f"e_phentsize is {phentsize}, expected {ph_size}")
    if phoff + phnum * phentsize > src.size:
        raise MalformedInput(
            path,
            f"truncated: program headers end at {phoff + phnum * phentsize}, "
            f"past the end of the file ({src.size} bytes)",
        )
    table = read_exact(src, phnum * phentsize, phoff, "program headers")
    segments = []
    for i in range(phnum):
        fields = struct.unpack_from(order + ph_fmt, table, i * phentsize)
        if bits_code == 1:
            p_type, offset, vaddr, _, filesz, memsz, flags, _ = fields
        else:
            p_type, flags, offset, vaddr, _, filesz, memsz, _ = fields
        segments.append(Segment(i, p_type, flags, offset, vaddr, filesz, memsz))
    return Elf(src, 32 * bits_code, order, tuple(segments), shoff, shnum, shentsize, shstrndx)


def _section_table(elf: Elf) -> bytes | None:
    """The section header table, or None when it is absent or implausible (a hint only)."""
    sh_size = _LAYOUT[elf.bits // 32][4]
    if elf.shoff == 0 or elf.shnum == 0 or elf.shnum >= SHN_LORESERVE:
        return None
    if elf.shentsize != sh_size or elf.shstrndx >= elf.shnum:
        return None
    if elf.shoff + elf.shnum * sh_size > elf.src.size:
        return None
    return read_exact(elf.src, elf.shnum * sh_size, elf.shoff, "section headers")


def section_addr(elf: Elf, name: bytes) -> int | None:
    """``sh_addr`` of the section called ``name``, or None (no or unusable section headers)."""
    return section_addrs(elf, (name,)).get(name)


def section_addrs(elf: Elf, names: Tuple[bytes, ...]) -> Dict[bytes, int]:
    """``sh_addr`` of each section in ``names`` that exists (first one of each name)."""
    table = _section_table(elf)
    if table is None:
        return {}
    fmt = elf.order + _LAYOUT[elf.bits // 32][3]
    size = struct.calcsize(fmt)

    def header(i: int) -> Tuple[int, int, int, int]:
        f = struct.unpack_from(fmt, table, i * size)
        return f[0], f[3], f[4], f[5]  # name, addr, offset, size

    _, _, str_off, str_size = header(elf.shstrndx)
    str_size = min(str_size, MAX_SHSTRTAB, max(0, elf.src.size - str_off))
    strtab = read_exact(elf.src, str_size, str_off, "section names")
    found: Dict[bytes, int] = {}
    for i in range(elf.shnum):
        name_off, addr, _, _ = header(i)
        end = strtab.find(b"\0", name_off)
        name = strtab[name_off:end] if end >= 0 else b""
        if name in names and name not in found:
            found[name] = int(addr)
    return found
