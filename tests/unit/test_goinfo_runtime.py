"""Go runtime evidence (pclntab + moduledata) on synthetic images: every layout in 32/64-bit
and both byte orders, the section hint, relocations, and hostile inputs. Real binaries are
in tests/integration/test_goinfo_runtime_real.py.
"""

from __future__ import annotations

import random
import struct
import time

import pytest

from agent.goinfo import MALFORMED, RUNTIME, GoEvidence, inspect_bytes
from agent.goinfo.runtime import MAX_CANDIDATES
from tests import goinfo_synth as gs
from tests import pclntab_synth as ps

pytestmark = pytest.mark.timeout(60)
FAST = 2.0  # seconds: every hostile case is answered well within this
FORMATS = {"1.2": "go1.2-1.15", "1.16": "go1.16-1.17", "1.18": "go1.18-1.19",
           "1.20": "go1.20+"}
MD = ps.DATA_VA + 64  # where ps.image puts the moduledata


def inspect(data: bytes) -> GoEvidence:
    t0 = time.monotonic()
    try:
        return inspect_bytes(data, "f")
    finally:
        assert time.monotonic() - t0 < FAST


@pytest.mark.parametrize("version", sorted(FORMATS))
@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("big", [False, True])
def test_every_layout_class_and_byte_order(version: str, bits: int, big: bool) -> None:
    t = ps.tables(version, bits, big, nfunc=40)
    found = inspect(ps.image(t, bits, big))
    assert found.established_by == RUNTIME and found.buildinfo is None
    rt = found.runtime
    assert rt is not None
    assert (rt.pclntab, rt.formats, rt.ptr_size, rt.nfunc, rt.found_by, rt.moduledata) == (
        ps.PCLN_VA, FORMATS[version], bits // 8, 40, "scan", MD)
    assert rt.byte_order == ("big" if big else "little")
    assert "no Go build info" in found.detail and rt.describe() in found.detail


@pytest.mark.parametrize("nfunc", [1, 2, 31, 32, 33, 500])
def test_small_and_large_function_tables(nfunc: int) -> None:
    rt = inspect(ps.image(ps.tables(nfunc=nfunc))).runtime
    assert rt is not None and rt.nfunc == nfunc and rt.moduledata == MD


def test_section_hint_and_an_obfuscated_magic() -> None:
    t = ps.tables("1.18")
    rt = inspect(ps.image(t, sections=((".gopclntab", ps.PCLN_VA),))).runtime
    assert rt is not None and rt.found_by == "section .gopclntab"
    # A magic of its own (garble patches linker and runtime alike): the section still names
    # the table, and the structure validates. Without the section it is not found: the
    # documented limit of static detection (docs/goinfo.md).
    odd = ps.tables("1.18", magic=0x12345678)
    named = inspect(ps.image(odd, sections=((".gopclntab", ps.PCLN_VA),)))
    assert named.runtime is not None
    assert named.runtime.formats == "unknown magic 0x12345678, go1.18+ layout"
    assert named.runtime.moduledata == MD
    assert not inspect(ps.image(odd)).is_go


def test_a_lying_section_header_falls_back_to_the_scan() -> None:
    t = ps.tables("1.20")
    rt = inspect(ps.image(t, sections=((".gopclntab", ps.DATA_VA),))).runtime
    assert rt is not None and rt.found_by == "scan" and rt.pclntab == ps.PCLN_VA


def test_without_moduledata_the_pclntab_still_counts() -> None:
    rt = inspect(ps.image(ps.tables(), with_moduledata=False)).runtime
    assert rt is not None and rt.moduledata is None
    assert "no moduledata found" in rt.describe()


def test_a_wrong_moduledata_is_not_taken() -> None:
    t = ps.tables()
    md = bytearray(t.moduledata)
    struct.pack_into("<Q", md, 17 * 8, 999)  # ftab len is not nfunc + 1
    rt = inspect(ps.image(ps.Tables(t.pclntab, bytes(md)))).runtime
    assert rt is not None and rt.moduledata is None


def test_moduledata_through_a_rela_relocation() -> None:
    """A PIE whose in-place pointer was zeroed: the loader takes it from the RELA addend."""
    t = ps.tables()
    md = bytearray(t.moduledata)
    md[0:8] = bytes(8)
    rela_va, dyn_va = 0x600000, 0x610000
    rela = struct.pack("<QQq", MD, 8, ps.PCLN_VA)  # R_X86_64_RELATIVE, no symbol
    rela += struct.pack("<QQq", MD + 8, (5 << 32) | 1, 0)  # a symbol's: ignored
    dynamic = struct.pack("<8q", 7, rela_va, 8, len(rela), 9, 24, 0, 0)
    data = b"\0" * 64 + bytes(md) + b"\0" * 64
    img = gs.Image([gs.TEXT, gs.Seg(ps.PF_R, ps.PCLN_VA, t.pclntab),
                    gs.Seg(gs.RW, ps.DATA_VA, data), gs.Seg(ps.PF_R, rela_va, rela),
                    gs.Seg(gs.RW, dyn_va, dynamic, type=2)]).build()
    rt = inspect(img).runtime
    assert rt is not None and rt.moduledata == MD
    without = gs.Image([gs.TEXT, gs.Seg(ps.PF_R, ps.PCLN_VA, t.pclntab),
                        gs.Seg(gs.RW, ps.DATA_VA, data)]).build()
    rt = inspect(without).runtime
    assert rt is not None and rt.moduledata is None


def test_build_info_and_runtime_together() -> None:
    t = ps.tables()
    blob = gs.inline_blob(b"go1.22.3", gs.frame(b"path\texample.com/x\n"))
    img = gs.Image([gs.TEXT, gs.Seg(ps.PF_R, ps.PCLN_VA, t.pclntab),
                    gs.Seg(gs.RW, ps.DATA_VA, blob + b"\0" * 64 + t.moduledata)]).build()
    plain = inspect_bytes(img, "f")
    assert plain.established_by == "build-info" and plain.runtime is None
    both = inspect_bytes(img, "f", runtime_always=True)
    assert both.buildinfo is not None and both.runtime is not None
    assert both.runtime.moduledata is not None


@pytest.mark.parametrize("damage, problem", [
    ("unsorted", "not sorted"),
    ("record", "starts with"),
    ("funcoff", "outside its table"),
    ("nfunc", "runs past its segment"),
    ("offset", "outside its segment"),
    ("pad", None),
])
def test_damaged_tables_are_not_go(damage: str, problem: str | None) -> None:
    t = ps.tables("1.20", nfunc=40)
    tab = bytearray(t.pclntab)
    header = 8 + 8 * 8
    pcln = struct.unpack_from("<Q", tab, 8 + 7 * 8)[0]
    if damage == "unsorted":  # slot 3 and its record agree, but slot 4 is lower
        struct.pack_into("<I", tab, pcln + 3 * 8, 0x7FFFFFF0)
        record = struct.unpack_from("<I", tab, pcln + 3 * 8 + 4)[0]
        struct.pack_into("<I", tab, pcln + record, 0x7FFFFFF0)
    elif damage == "record":
        first = struct.unpack_from("<I", tab, pcln + 4)[0]
        struct.pack_into("<I", tab, pcln + first, 0x1234)
    elif damage == "funcoff":
        struct.pack_into("<I", tab, pcln + 4, 4)
    elif damage == "nfunc":
        struct.pack_into("<Q", tab, 8, 1 << 20)
    elif damage == "offset":
        struct.pack_into("<Q", tab, 8 + 3 * 8, len(tab) + 4096)
    else:
        tab[4] = 1
    assert header < pcln
    found = inspect(ps.image(ps.Tables(bytes(tab), t.moduledata)))
    assert not found.is_go and found.runtime is None
    assert "no Go build info" in found.detail and "no Go runtime" in found.detail
    if problem is not None:
        assert problem in found.detail


def test_random_bytes_behind_a_header_prefix_are_not_go() -> None:
    rng = random.Random(9)
    prefix = struct.pack("<IBBBB", 0xFFFFFFF1, 0, 0, 1, 8)
    blob = b"".join(prefix + rng.randbytes(rng.randrange(8, 400)) for _ in range(300))
    found = inspect(ps.image(ps.Tables(blob, b"")))
    assert not found.is_go


def test_too_many_header_prefixes_is_hostile_and_answered_fast() -> None:
    prefix = struct.pack("<IBBBB", 0xFFFFFFF0, 0, 0, 1, 8) + bytes(8)
    found = inspect(ps.image(ps.Tables(prefix * (MAX_CANDIDATES + 1), b"")))
    assert found.established_by == MALFORMED and "refusing to search further" in found.detail


def test_a_large_file_of_near_misses_is_answered_fast() -> None:
    near = b"\xf2\xff\xff\xff\x00\x00\x01\x08" + b"\xff\xff\xff\x00\x00\x03\x08\x00"
    found = inspect(ps.image(ps.Tables(near * (4 << 20), b"")))  # 64 MiB
    assert not found.is_go


def test_overlapping_segments_are_scanned_once() -> None:
    t = ps.tables()
    segs = [gs.TEXT, gs.Seg(ps.PF_R, ps.PCLN_VA, t.pclntab),
            gs.Seg(gs.RW, ps.DATA_VA, b"\0" * 64 + t.moduledata + b"\0" * (8 << 20))]
    img = bytearray(gs.Image(segs).build())
    # 3000 more program headers, each mapping the whole file again
    phoff, count = 64 + 56 * 3, 3000
    extra = b"".join(struct.pack("<IIQQQQQQ", 1, 4, 0, 0x10000000 + i * 0x1000000,
                                 0, len(img), len(img), 0x1000) for i in range(count))
    img = img[:phoff] + bytearray(extra) + img[phoff:]
    # shift every segment's file offset past the inserted table and fix e_phnum
    for i in range(3):
        at = 64 + 56 * i
        off = struct.unpack_from("<Q", img, at + 8)[0]
        struct.pack_into("<Q", img, at + 8, off + len(extra))
    struct.pack_into("<H", img, 0x38, 3 + count)
    found = inspect(bytes(img))
    assert found.established_by == RUNTIME


def test_truncated_segments_and_stray_bytes_do_not_crash() -> None:
    t = ps.tables()
    img = ps.image(t)
    for cut in (100, 200, len(img) // 2, len(img) - 10):
        found = inspect(img[:cut])
        assert isinstance(found, GoEvidence)


def test_non_elf_and_empty_files_are_not_go() -> None:
    for data in (b"", b"#!/bin/sh\necho hi\n", b"\x7fELF"):
        found = inspect(data)
        assert found.established_by in (None, MALFORMED)
    assert not inspect(b"#!/bin/sh\n").is_go


def test_most_program_headers_and_most_candidates_answered_fast() -> None:
    """4096 program headers, 4093 of them decoys listed first (each candidate's segment is
    looked up past them), and the largest number of header prefixes still examined."""
    prefix = struct.pack("<IBBBB", 0xFFFFFFF0, 0, 0, 1, 8) + struct.pack("<Q", 5) + bytes(64)
    img = bytearray(ps.image(ps.Tables(prefix * MAX_CANDIDATES, b"")))
    decoys = b"".join(struct.pack("<IIQQQQQQ", 1, 4, 0, 0x10000000 + i * 0x1000000, 0, 64,
                                  64, 0x1000) for i in range(4093))
    img = img[:64] + bytearray(decoys) + img[64:]
    for i in range(3):
        at = 64 + len(decoys) + 56 * i
        struct.pack_into("<Q", img, at + 8, struct.unpack_from("<Q", img, at + 8)[0]
                         + len(decoys))
    struct.pack_into("<H", img, 0x38, 4096)
    found = inspect(bytes(img))
    assert not found.is_go and "no Go runtime" in found.detail
