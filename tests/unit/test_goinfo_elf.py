"""Synthetic ELF images: both blob layouts, the segment scan, and the hostile inputs of
research/go_buildinfo.md section 9. Each hostile case must fail with a specific error, fast.
"""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

import pytest

from agent.digest import Artifact
from agent.errors import MalformedInput, NotGoBinary
from agent.goinfo import BuildInfo, NoGoBuildInfo, parse_bytes, read_buildinfo
from tests import goinfo_synth as s

MOD = s.frame(
    b"path\texample.com/x\nmod\texample.com/x\t(devel)\t\ndep\tgolang.org/x/sys\tv0.1.0\th1:a=\n"
    b"build\tGOOS=linux\n"
)
V = b"go1.22.3"
pytestmark = pytest.mark.timeout(60)  # a hang in the parser fails the module, not CI
FAST = 2.0  # seconds: every hostile case must be answered well within this


def parse_fast(data: bytes) -> BuildInfo:
    t0 = time.monotonic()
    try:
        return parse_bytes(data, "f")
    finally:
        assert time.monotonic() - t0 < FAST


def malformed(data: bytes, match: str) -> None:
    with pytest.raises(MalformedInput, match=match):
        parse_fast(data)


def not_go(data: bytes, match: str) -> None:
    with pytest.raises(NotGoBinary, match=match) as err:
        parse_fast(data)
    assert isinstance(err.value, NoGoBuildInfo) and err.value.path == "f"


def test_inline_le64() -> None:
    info = parse_fast(s.simple_image(s.inline_blob(V, MOD)))
    assert info.go_version == "go1.22.3" and not info.pointer_format
    assert info.path == "example.com/x" and info.deps[0].version == "v0.1.0"


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("big", [False, True])
def test_inline_every_class_and_byte_order(bits: int, big: bool) -> None:
    blob = s.inline_blob(V, MOD, ptrsize=bits // 8, big_endian=big)
    assert parse_fast(s.simple_image(blob, bits=bits, big_endian=big)).path == "example.com/x"


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("big", [False, True])
def test_pointer_format_synthetic(bits: int, big: bool) -> None:
    # SYNTHETIC: no real big-endian pre-1.18 binary is obtainable (see docs/goinfo.md);
    # the real little-endian ones are the esbuild npm packages in the integration tests.
    seg = s.pointer_segment(0x10000, b"go1.15", MOD, ptrsize=bits // 8, big_endian=big)
    data = s.Image([s.Seg(s.RX, 0x1000, b"x" * 16), s.Seg(s.RW, 0x10000, seg)], bits, big).build()
    info = parse_fast(data)
    assert info.pointer_format and info.go_version == "go1.15"
    assert info.main is not None and info.main.path == "example.com/x"


def test_pointer_format_empty_modinfo_is_version_only() -> None:
    info = parse_fast(s.simple_image(s.pointer_segment(0x500000, b"go1.13", b"")))
    assert info.format_like_go_version_m("f") == "f: go1.13\n"


def test_no_section_headers_blob_in_second_rw_segment() -> None:
    # An internally linked PIE: RELRO first, blob at the start of the second RW segment.
    img = s.Image(
        [s.TEXT, s.Seg(s.RW, 0x500000, b"\0" * 4096), s.Seg(s.RW, 0x600000, s.inline_blob(V, MOD))]
    ).build()
    assert parse_fast(img).go_version == "go1.22.3"


def test_blob_deep_inside_segment_past_64k_and_across_chunks() -> None:
    for lead in (70_000 * 16, (1 << 20) - 16, (1 << 20) + 16 * 3):
        seg = s.Seg(s.RW, 0x500000, b"\0" * lead + s.inline_blob(V, MOD))
        assert parse_fast(s.Image([s.TEXT, seg]).build()).path == "example.com/x"


def test_section_header_is_followed_and_lying_one_is_survived() -> None:
    blob_seg = s.Seg(s.RW, 0x600000, s.inline_blob(V, MOD))
    other = s.Seg(s.RW, 0x500000, b"\0" * 64)
    good = s.Image([s.TEXT, other, blob_seg], sections=[(".go.buildinfo", 0x600000)])
    assert parse_fast(good.build()).path == "example.com/x"
    lying = s.Image([s.TEXT, other, blob_seg], sections=[(".go.buildinfo", 0x123)])
    assert parse_fast(lying.build()).path == "example.com/x"
    renamed = s.Image([s.TEXT, other, blob_seg], sections=[(".data", 0x600000)])
    assert parse_fast(renamed.build()).path == "example.com/x"


def test_first_aligned_hit_wins_and_text_segment_is_not_scanned() -> None:
    fake = s.inline_blob(b"go1.99.0", s.frame(b"path\tfake\n"))
    text = s.Seg(s.RX, 0x400000, s.inline_blob(b"go1.0", b""))  # magic in code: ignored
    img = s.Image([text, s.Seg(s.RW, 0x500000, s.inline_blob(V, MOD) + fake)]).build()
    assert parse_fast(img).go_version == "go1.22.3"


def test_fake_blob_in_any_elf_is_reported_as_a_claim() -> None:
    # Build info is not authenticated: a C program can carry a perfect blob.
    img = s.simple_image(s.inline_blob(b"go1.99.0", s.frame(b"path\texample.com/not-go\n")))
    assert parse_fast(img).go_version == "go1.99.0"


# --- research section 9 ---------------------------------------------------------------


def test_zero_length_and_tiny_and_text_files() -> None:
    not_go(b"", "not an ELF file")
    not_go(b"#!/bin/sh\necho hi\n", "not an ELF file")
    not_go(s.MAGIC + b"\x08\x02" + b"\0" * 40, "not an ELF file")
    malformed(b"\x7fELF\x02\x01", "truncated ELF header")
    malformed(b"\x7fELF\x02\x01\x01" + b"\0" * 20, "truncated ELF header")


def test_bad_ident_and_phentsize() -> None:
    img = bytearray(s.simple_image(s.inline_blob(V, MOD)))
    bad_class = bytes(img[:4]) + b"\x03" + bytes(img[5:])
    malformed(bad_class, "unknown class")
    img[54:56] = (40).to_bytes(2, "little")  # e_phentsize
    malformed(bytes(img), "e_phentsize is 40")


def test_no_program_headers() -> None:
    not_go(s.Image([], phnum=0).build() + b"\0" * 64, "no program headers")


def test_phnum_overflow() -> None:
    img = s.Image([s.TEXT], phnum=65535).build().ljust(4096, b"\0")
    malformed(img, "e_phnum 65535")
    img = s.Image([s.TEXT], phnum=4000).build().ljust(4096, b"\0")
    malformed(img, "program headers end at .* past the end of the file")


def test_filesz_beyond_eof_is_clipped() -> None:
    seg = s.Seg(s.RW, 0x500000, s.inline_blob(V, MOD), filesz=1 << 40)
    assert parse_fast(s.Image([s.TEXT, seg]).build()).path == "example.com/x"
    empty = s.Seg(s.RW, 0x500000, b"\0" * 64, filesz=1 << 30)
    malformed(s.Image([s.TEXT, empty]).build(), "truncated: no Go build info")


def test_truncated_images() -> None:
    full = s.simple_image(s.inline_blob(V, MOD))
    blob_at = full.index(s.MAGIC)
    malformed(full[: blob_at + 20], "truncated inside build-info header")
    malformed(full[: blob_at + 40], "truncated|exceeds")
    malformed(full[:blob_at], "truncated: no Go build info")


def test_magic_near_segment_end_and_misaligned() -> None:
    short = s.Seg(s.RW, 0x500000, b"\0" * 16 + s.MAGIC + b"\x08\x02" + b"\0" * 8)
    not_go(s.Image([s.TEXT, short]).build(), "no Go build info")
    shifted = s.Seg(s.RW, 0x500000, b"\0" * 8 + s.inline_blob(V, MOD))
    not_go(s.Image([s.TEXT, shifted]).build(), "no Go build info")
    odd_vaddr = s.Seg(s.RW, 0x500008, s.inline_blob(V, MOD))  # aligned in file, not in VA
    not_go(s.Image([s.TEXT, odd_vaddr]).build(), "no Go build info")


def test_many_misaligned_magics_are_bounded() -> None:
    seg = s.Seg(s.RW, 0x500000, (b"\0" + s.MAGIC + b"\0").ljust(16, b"\0") * 200_000)
    malformed(s.Image([s.TEXT, seg]).build(), "too many misaligned")


def head(ptrsize: int = 8, flags: int = 2) -> bytes:
    return s.MAGIC + bytes([ptrsize, flags]) + b"\0" * 16


@pytest.mark.parametrize(
    ("tail", "match"),
    [
        (s.uvarint(1 << 62) + V, "Go version length 4611686018427387904 exceeds"),
        (s.uvarint(5000) + b"g" * 5000, "Go version is 5000 bytes, over the 4096"),
        (s.uvarint(0) + s.uvarint(0), "empty Go version"),
        (s.uvarint(8) + V + s.uvarint(1 << 62), "module info length .* exceeds"),
        (b"\xff" * 11, "overflows 64 bits"),  # Go's rule: a 10th byte above 1
        (b"\x80" * 9 + b"\x02", "overflows 64 bits"),
        (
            s.uvarint(8) + V + s.uvarint(44) + s.frame(b"dep\ta\tb\tc\td\n"),
            "could not parse Go build info: line 1: expected 2 or 3 columns; got 4",
        ),
    ],
)
def test_inline_hostile(tail: bytes, match: str) -> None:
    malformed(s.simple_image(s.pad16(head() + tail)), match)


@pytest.mark.parametrize("tail", [s.uvarint(8) + V + s.uvarint(3) + b"abc",
                                  s.uvarint(8) + V + s.uvarint(len(MOD[:-1])) + MOD[:-1]])
def test_broken_module_info_framing_leaves_the_version_and_says_why(tail: bytes) -> None:
    """Go drops module info it cannot unframe and reports the version alone; so do we,
    saying so (predicates on modules then fail closed: agent/policy/predicates.py)."""
    info = parse_fast(s.simple_image(s.pad16(head() + tail)))
    assert info.go_version == "go1.22.3" and info.main is None and info.deps == ()
    assert info.no_module_info == "module info framing is broken"


def test_varint_running_off_the_segment_end() -> None:
    seg = s.Seg(s.RW, 0x500000, head() + b"\x88\x80")
    malformed(s.Image([s.TEXT, seg]).build(), "truncated: length of Go version runs past")


def test_blob_ending_right_at_segment_end_reads() -> None:
    # go1.24.4 rejects this (a varint read wants 10 bytes); the data is complete, so we read it.
    seg = s.Seg(s.RW, 0x500000, head() + s.uvarint(8) + V + s.uvarint(0))
    assert parse_fast(s.Image([s.TEXT, seg]).build()).go_version == "go1.22.3"


def test_huge_modinfo_is_read_in_full() -> None:
    big = b"build\t-ldflags=-X=main.x=" + b"a" * 200_000 + b"\n"
    info = parse_fast(s.simple_image(s.inline_blob(V, s.frame(b"path\tp\n" + big))))
    assert len(info.setting("-ldflags") or "") > 200_000


def test_modinfo_over_the_cap_is_refused_without_reading_it() -> None:
    length = (16 << 20) + 33
    seg = s.Seg(
        s.RW, 0x500000, head() + s.uvarint(8) + V + s.uvarint(length) + b"\0" * 16, filesz=1 << 30
    )
    malformed(s.Image([s.TEXT, seg]).build(), "exceeds|over the")


def ptr_image(**kw: int) -> bytes:
    seg = s.pointer_segment(0x500000, b"go1.15", MOD, **kw)  # type: ignore[arg-type]
    return s.Image([s.TEXT, s.Seg(s.RW, 0x500000, seg)]).build()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"vers_ptr": 0}, "Go version pointer is zero"),
        ({"mod_ptr": 0}, "module info pointer is zero"),
        ({"vers_ptr": 0x10}, "Go version pointer 0x10 is outside every segment"),
        ({"mod_ptr": 0x7FFFFFFFFFFF}, "module info pointer 0x7fffffffffff is outside"),
        ({"mod_len": 1 << 40}, "module info is 1099511627776 bytes, over"),
        ({"mod_len": 1 << 20}, "module info at .* runs past its segment"),
        ({"ptrsize": 4, "big_endian": 1, "vers_ptr": 0x500000 + 20}, "runs past|outside|Go"),
    ],
)
def test_pointer_hostile(kw: dict[str, int], match: str) -> None:
    malformed(ptr_image(**kw), match)


def test_pointer_string_header_straddling_segment_end() -> None:
    size = len(s.pointer_segment(0x500000, b"go1.15", MOD))
    malformed(ptr_image(vers_ptr=0x500000 + size - 8), "header at .* runs past its segment")


def test_pointer_bad_ptrsize() -> None:
    seg = bytearray(s.pointer_segment(0x500000, b"go1.15", MOD))
    seg[14] = 5
    malformed(s.Image([s.TEXT, s.Seg(s.RW, 0x500000, bytes(seg))]).build(), "pointer size is 5")


def test_pointer_into_bss_is_refused() -> None:
    seg = s.pointer_segment(0x500000, b"go1.15", MOD, vers_ptr=0x600010)
    bss = s.Seg(s.RW, 0x600000, b"", filesz=0)
    malformed(s.Image([s.TEXT, s.Seg(s.RW, 0x500000, seg), bss]).build(), "outside every")


# --- through a real fd ------------------------------------------------------------------


def test_big_sparse_segment_scans_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    img = s.Image([s.TEXT, s.Seg(s.RW, 0x500000, b"\0" * 16, filesz=199 << 20)]).build()
    path.write_bytes(img)
    os.truncate(path, 200 << 20)
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with Artifact.open(str(path)) as art, pytest.raises(NoGoBuildInfo):
            read_buildinfo(art)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    assert time.monotonic() - t0 < 10


def test_file_truncated_after_open_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "shrinks"
    path.write_bytes(s.simple_image(s.inline_blob(V, MOD)))
    with Artifact.open(str(path)) as art:
        os.truncate(path, 200)
        with pytest.raises(MalformedInput, match="changed or truncated"):
            read_buildinfo(art)


def test_read_buildinfo_on_artifact(tmp_path: Path) -> None:
    path = tmp_path / "ok"
    path.write_bytes(s.simple_image(s.inline_blob(V, MOD)))
    with Artifact.open(str(path)) as art:
        assert read_buildinfo(art).path == "example.com/x"


def test_overlapping_segments_share_one_scan_budget() -> None:
    # 4000 RW program headers that all cover the same 1 MiB: one scan, not 4000.
    payload = b"\0" * (1 << 20)
    segs = [s.Seg(s.RW, 0x500000, payload)] + [
        s.Seg(s.RW, 0x500000, b"", filesz=len(payload)) for _ in range(3999)
    ]
    img = bytearray(s.Image(segs).build())
    first_offset = int.from_bytes(img[64 + 8 : 64 + 16], "little")
    for i in range(1, 4000):  # point every header at the first segment's bytes
        img[64 + i * 56 + 8 : 64 + i * 56 + 16] = first_offset.to_bytes(8, "little")
    malformed(bytes(img), "scan budget exhausted")


def test_misaligned_budget_is_shared_across_segments() -> None:
    noisy = (b"\0" + s.MAGIC + b"\0").ljust(16, b"\0") * 3000
    segs = [s.Seg(s.RW, 0x500000 + i * 0x100000, noisy) for i in range(3)]
    malformed(s.Image([s.TEXT, *segs]).build(), "too many misaligned")
