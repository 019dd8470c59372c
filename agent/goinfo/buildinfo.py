"""Find the ``go:buildinfo`` blob through the program headers and decode both of its layouts."""

from __future__ import annotations

import struct
from dataclasses import replace
from typing import List, Tuple

from agent.errors import MalformedInput
from agent.goinfo.elf import Elf, Segment, parse_elf, section_addr
from agent.goinfo.model import BuildInfo, NoGoBuildInfo
from agent.goinfo.modinfo import ModinfoError, parse_modinfo, unframe
from agent.goinfo.source import Source

MAGIC = b"\xff Go buildinf:"
HEADER_SIZE = 32
ALIGN = 16
CHUNK = 1 << 20
MAX_MISALIGNED = 4096  # more stray magics than this is an attack on the scan loop
MAX_VERSION = 4096
MAX_MODINFO = 16 << 20
FLAG_BIG_ENDIAN, FLAG_INLINE = 1, 2


class _Scanner:
    """Searches segments for the blob, with one work budget shared by all the segments.

    The budget matters because program headers may overlap: thousands of RW segments that
    each cover the whole file must not turn into thousands of full-file scans.
    """

    def __init__(self, elf: Elf) -> None:
        self.elf = elf
        self.budget = 2 * elf.src.size + CHUNK  # the section's segment may be scanned twice
        self.misaligned = 0

    def scan(self, seg: Segment, start: int) -> int | None:
        """First absolutely 16-aligned magic at or after ``start`` in ``seg``, 32 bytes left.

        Reads the segment's file bytes in 1 MiB windows, never more than one at a time.
        """
        elf = self.elf
        end = elf.file_end(seg)
        pos = max(start, seg.vaddr)
        while pos < end:
            window = min(CHUNK + len(MAGIC) - 1, end - pos)
            self.budget -= window
            if self.budget < 0:
                raise MalformedInput(elf.src.path, "overlapping segments: scan budget exhausted")
            data = elf.read_va(seg, pos, window, "a writable segment")
            i = data.find(MAGIC)
            while 0 <= i < CHUNK:
                addr = pos + i
                if addr % ALIGN == 0:
                    if end - addr >= HEADER_SIZE:
                        return addr
                    if elf.clipped(seg):
                        raise MalformedInput(elf.src.path, "truncated inside build-info header")
                    return None  # Go too stops at the first aligned hit
                self.misaligned += 1
                if self.misaligned > MAX_MISALIGNED:
                    raise MalformedInput(elf.src.path, "too many misaligned build-info magics")
                i = data.find(MAGIC, i + 1)
            pos += CHUNK
        return None


def _locate(elf: Elf) -> Tuple[Segment, int]:
    """The segment holding the blob and the blob's address."""
    candidates: List[Tuple[Segment, int]] = []
    start = section_addr(elf, b".go.buildinfo")
    section_seg = elf.segment_at(start) if start is not None else None
    if section_seg is not None and start is not None:
        candidates.append((section_seg, start))
    # Then, unlike Go (first RW segment only, and only without the section), every RW
    # segment: an internally linked PIE keeps the blob in its second RW segment.
    candidates += [(s, s.vaddr) for s in elf.segments if s.writable_data]
    scanner = _Scanner(elf)
    for seg, begin in candidates:
        addr = scanner.scan(seg, begin)
        if addr is not None:
            return seg, addr
    if any(elf.clipped(s) for s, _ in candidates):
        raise MalformedInput(elf.src.path, "truncated: no Go build info in the part present")
    raise NoGoBuildInfo(elf.src.path, "no Go build info (no magic in its writable segments)")


def _uvarint(elf: Elf, seg: Segment, addr: int, what: str) -> Tuple[int, int]:
    """A LEB128 varint read byte by byte within the segment; returns (value, next address)."""
    avail = min(10, elf.file_end(seg) - addr)
    raw = elf.read_va(seg, addr, max(avail, 0), what) if avail > 0 else b""
    value = 0
    for i, b in enumerate(raw):
        if i == 9 and b > 1:
            raise MalformedInput(elf.src.path, f"{what} overflows 64 bits")
        value |= (b & 0x7F) << (7 * i)
        if b < 0x80:
            return value, addr + i + 1
    # Ten bytes always end or overflow above, so only running out of bytes gets here.
    raise MalformedInput(elf.src.path, f"truncated: {what} runs past the end of its segment")


def _inline_string(elf: Elf, seg: Segment, addr: int, limit: int, what: str) -> Tuple[bytes, int]:
    length, addr = _uvarint(elf, seg, addr, f"length of {what}")
    left = elf.file_end(seg) - addr
    if length > left:
        raise MalformedInput(
            elf.src.path, f"{what} length {length} exceeds the {left} bytes left in its segment"
        )
    if length > limit:
        raise MalformedInput(elf.src.path, f"{what} is {length} bytes, over the {limit} limit")
    return elf.read_va(seg, addr, length, what), addr + length


def _pointer_string(elf: Elf, ptr: int, ptrsize: int, order: str, limit: int, what: str) -> bytes:
    """A Go string through its header {data, len} at ``ptr`` (pre-1.18 layout)."""
    if ptr == 0:
        raise MalformedInput(elf.src.path, f"{what} pointer is zero (unrelocated build info?)")
    seg = elf.segment_at(ptr)
    if seg is None:
        raise MalformedInput(elf.src.path, f"{what} pointer {ptr:#x} is outside every segment")
    fmt = order + ("I" if ptrsize == 4 else "Q") * 2
    data, length = struct.unpack(fmt, elf.read_va(seg, ptr, 2 * ptrsize, f"{what} header"))
    if length == 0:
        return b""
    if length > limit:
        raise MalformedInput(elf.src.path, f"{what} is {length} bytes, over the {limit} limit")
    seg = elf.segment_at(data)
    if seg is None:
        raise MalformedInput(elf.src.path, f"{what} data {data:#x} is outside every segment")
    return elf.read_va(seg, data, length, what)


def _decode(elf: Elf, seg: Segment, addr: int) -> BuildInfo:
    path = elf.src.path
    header = elf.read_va(seg, addr, HEADER_SIZE, "build-info header")
    ptrsize, flags = header[14], header[15]
    inline = bool(flags & FLAG_INLINE)  # tested first, as the flag decides the layout
    missing = ""
    if inline:
        version, after = _inline_string(elf, seg, addr + HEADER_SIZE, MAX_VERSION, "Go version")
        raw_mod, _ = _inline_string(elf, seg, after, MAX_MODINFO + 32, "module info")
    else:
        if ptrsize not in (4, 8):
            raise MalformedInput(path, f"build-info pointer size is {ptrsize}, not 4 or 8")
        order = ">" if flags & FLAG_BIG_ENDIAN else "<"
        fmt = order + ("I" if ptrsize == 4 else "Q") * 2
        vers_ptr, mod_ptr = struct.unpack_from(fmt, header, 16)
        version = _pointer_string(elf, vers_ptr, ptrsize, order, MAX_VERSION, "Go version")
        if elf.zero_filled(mod_ptr, 2 * ptrsize):
            # a GOPATH build (Go 1.13-1.17 without modules) leaves runtime.modinfo empty,
            # in .bss: a zero string header, which Go reads as no module info
            raw_mod, missing = b"", "a zero (.bss) runtime.modinfo: built without modules"
        else:
            raw_mod = _pointer_string(elf, mod_ptr, ptrsize, order, MAX_MODINFO + 32,
                                      "module info")
    if not version:
        raise MalformedInput(path, "build info has an empty Go version")
    text = unframe(raw_mod)
    if text is None:
        # Go reports the version alone (debug/buildinfo drops what it cannot unframe): the
        # file is Go, and claims no modules; predicates on modules then fail closed
        text, missing = b"", "module info framing is broken"
    try:
        info = parse_modinfo(text, version.decode("utf-8", "surrogateescape"), not inline)
    except ModinfoError as exc:
        raise MalformedInput(path, f"could not parse Go build info: {exc}") from None
    return replace(info, no_module_info=missing) if missing else info


def read_elf(elf: Elf) -> BuildInfo:
    """The build info of an already parsed ELF file (raises as ``read_source``)."""
    seg, addr = _locate(elf)
    return _decode(elf, seg, addr)


def read_source(src: Source) -> BuildInfo:
    return read_elf(parse_elf(src))
