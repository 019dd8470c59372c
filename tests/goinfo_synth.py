"""Synthetic ELF images with build-info blobs, built with struct for the parser's unit tests.

Everything here is synthetic: real binaries come from tests/goinfo_fixtures.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

MAGIC = b"\xff Go buildinf:"
INFO_START = bytes.fromhex("3077af0c9274080241e1c107e6d618e6")
INFO_END = bytes.fromhex("f932433186182072008242104116d8f2")
PF_R, PF_W, PF_X = 4, 2, 1
RW, RX = PF_R | PF_W, PF_R | PF_X
PT_LOAD, PT_NOTE = 1, 4


def uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def frame(text: bytes) -> bytes:
    return INFO_START + text + INFO_END


def pad16(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 16)


def inline_blob(
    version: bytes, modinfo: bytes, ptrsize: int = 8, big_endian: bool = False
) -> bytes:
    """The Go 1.18+ layout: header, then two varint-prefixed strings, zero-padded to 16."""
    head = MAGIC + bytes([ptrsize, 2 | int(big_endian)]) + b"\0" * 16
    return pad16(head + uvarint(len(version)) + version + uvarint(len(modinfo)) + modinfo)


def pointer_segment(
    vaddr: int,
    version: bytes,
    modinfo: bytes,
    ptrsize: int = 8,
    big_endian: bool = False,
    vers_ptr: int | None = None,
    mod_ptr: int | None = None,
    mod_len: int | None = None,
) -> bytes:
    """A segment image for the Go 1.13-1.17 layout starting at ``vaddr``.

    Layout: header (32) | version string header | modinfo string header | version | modinfo.
    The pointer and length arguments override the honest values (for hostile tests).
    """
    order = ">" if big_endian else "<"
    word = order + ("I" if ptrsize == 4 else "Q") * 2
    hdr_v, hdr_m = vaddr + 32, vaddr + 32 + 2 * ptrsize
    data_v = hdr_m + 2 * ptrsize
    data_m = data_v + len(version)
    head = MAGIC + bytes([ptrsize, int(big_endian)])
    pointers = struct.pack(
        word, hdr_v if vers_ptr is None else vers_ptr, hdr_m if mod_ptr is None else mod_ptr
    )
    head = (head + pointers).ljust(32, b"\0")
    body = struct.pack(word, data_v, len(version))
    body += struct.pack(word, data_m, len(modinfo) if mod_len is None else mod_len)
    return pad16(head + body + version + modinfo)


@dataclass
class Seg:
    flags: int
    vaddr: int
    data: bytes
    filesz: int | None = None  # default len(data); larger values claim bytes past EOF
    type: int = PT_LOAD


@dataclass
class Image:
    """An ELF file: header, program headers, segment data and optional section headers."""

    segments: List[Seg]
    bits: int = 64
    big_endian: bool = False
    sections: Sequence[Tuple[str, int]] = ()  # (name, address); offsets derived from segments
    e_type: int = 2
    machine: int = 62
    phnum: int | None = None  # override e_phnum
    extra: bytes = field(default=b"")

    def build(self) -> bytes:
        o = ">" if self.big_endian else "<"
        is64 = self.bits == 64
        ehsize, phsize, shsize = (64, 56, 64) if is64 else (52, 32, 40)
        offsets, pos = [], ehsize + phsize * len(self.segments)
        for seg in self.segments:
            pos += -pos % 16
            offsets.append(pos)
            pos += len(seg.data)
        body = bytearray(pos)
        for seg, off in zip(self.segments, offsets):
            body[off : off + len(seg.data)] = seg.data
        shoff = shnum = shstrndx = 0
        if self.sections:
            body += b"\0" * (-len(body) % 16)
            names = b"\0" + b"".join(n.encode() + b"\0" for n, _ in self.sections) + b".shstrtab\0"
            str_off = len(body)
            body += names
            body += b"\0" * (-len(body) % 16)
            shoff, shnum, shstrndx = len(body), len(self.sections) + 2, len(self.sections) + 1
            fmt = o + ("IIQQQQIIQQ" if is64 else "IIIIIIIIII")
            body += struct.pack(fmt, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
            name_pos = 1
            for name, addr in self.sections:
                body += struct.pack(
                    fmt, name_pos, 1, 3, addr, self._offset(addr, offsets), 32, 0, 0, 16, 0
                )
                name_pos += len(name) + 1
            body += struct.pack(fmt, name_pos, 3, 0, 0, str_off, len(names), 0, 0, 1, 0)
        phnum = len(self.segments) if self.phnum is None else self.phnum
        ident = b"\x7fELF" + bytes([2 if is64 else 1, 2 if self.big_endian else 1, 1]) + bytes(9)
        hfmt = o + ("HHIQQQIHHHHHH" if is64 else "HHIIIIIHHHHHH")
        header = ident + struct.pack(
            hfmt,
            self.e_type,
            self.machine,
            1,
            0,
            ehsize,
            shoff,
            0,
            ehsize,
            phsize,
            phnum,
            shsize,
            shnum,
            shstrndx,
        )
        body[: len(header)] = header
        for i, (seg, off) in enumerate(zip(self.segments, offsets)):
            filesz = len(seg.data) if seg.filesz is None else seg.filesz
            memsz = max(filesz, len(seg.data))
            if is64:
                ph = struct.pack(
                    o + "IIQQQQQQ",
                    seg.type,
                    seg.flags,
                    off,
                    seg.vaddr,
                    seg.vaddr,
                    filesz,
                    memsz,
                    0x1000,
                )
            else:
                ph = struct.pack(
                    o + "IIIIIIII",
                    seg.type,
                    off,
                    seg.vaddr,
                    seg.vaddr,
                    filesz,
                    memsz,
                    seg.flags,
                    0x1000,
                )
            body[ehsize + i * phsize : ehsize + (i + 1) * phsize] = ph
        return bytes(body) + self.extra

    def _offset(self, addr: int, offsets: List[int]) -> int:
        for seg, off in zip(self.segments, offsets):
            if seg.vaddr <= addr < seg.vaddr + len(seg.data):
                return off + addr - seg.vaddr
        return 0


TEXT = Seg(RX, 0x400000, b"\x90" * 64)


def simple_image(blob: bytes, bits: int = 64, big_endian: bool = False) -> bytes:
    """A text segment plus one RW segment at 0x500000 that starts with ``blob``."""
    return Image([TEXT, Seg(RW, 0x500000, blob + b"\0" * 64)], bits, big_endian).build()
