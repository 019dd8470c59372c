"""Struct offsets from BTF (agent/sensors/kernel_layout.py): synthetic blobs and this kernel's."""

from __future__ import annotations

import contextlib
import os
import random
import struct
from typing import Dict, List, Sequence, Tuple

import pytest

from agent.sensors.kernel_layout import VMLINUX_BTF, Btf, LayoutError, exec_sensor_offsets

Member = Tuple[str, int, int]  # name, type id, bit offset


class BtfBuilder:
    """Writes the little-endian BTF format: header, type records, string section."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.types = bytearray()
        self.count = 0

    def _str(self, s: str) -> int:
        if not s:
            return 0
        off = len(self.strings)
        self.strings += s.encode() + b"\0"
        return off

    def _add(self, name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"",
             kind_flag: int = 0) -> int:  # fmt: skip
        info = (kind_flag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self._str(name), info, size_or_type) + extra
        self.count += 1
        return self.count

    def int_(self, name: str, size: int) -> int:
        return self._add(name, 1, 0, size, struct.pack("<I", size * 8))

    def ptr(self, to: int) -> int:
        return self._add("", 2, 0, to)

    def typedef(self, name: str, to: int) -> int:
        return self._add(name, 8, 0, to)

    def array(self, elem: int, n: int) -> int:
        return self._add("", 3, 0, 0, struct.pack("<III", elem, elem, n))

    def struct_(self, name: str, size: int, members: Sequence[Member], union: bool = False,
                kind_flag: int = 0) -> int:  # fmt: skip
        extra = b"".join(struct.pack("<III", self._str(n), t, off) for n, t, off in members)
        return self._add(name, 5 if union else 4, len(members), size, extra, kind_flag)

    def func_proto(self, ret: int, nparams: int) -> int:
        return self._add("", 13, nparams, ret, b"\0" * 8 * nparams)

    def blob(self, magic: int = 0xEB9F) -> bytes:
        hdr = struct.pack("<HBBIIIII", magic, 1, 0, 24, 0, len(self.types), len(self.types),
                          len(self.strings))  # fmt: skip
        return hdr + bytes(self.types) + bytes(self.strings)


def kernel_like(new_ctime: bool, audit: bool = True) -> bytes:
    """The structs the exec sensor reads, with a 6.11+ or a timespec64 inode ctime."""
    b = BtfBuilder()
    u32, u64 = b.int_("unsigned int", 4), b.int_("long long unsigned int", 8)
    s64 = b.typedef("time64_t", b.int_("long long int", 8))
    b.func_proto(u32, 2)  # a kind with per-member data the walk must skip
    b.array(u32, 4)
    vp = b.ptr(0)
    b.struct_("linux_binprm", 200, [("vma", vp, 0), ("file", vp, 64 * 8), ("filename", vp, 96 * 8),
                                    ("interp", vp, 104 * 8)])
    b.struct_("file", 100, [("f_inode", vp, 32 * 8)])
    b.struct_("super_block", 100, [("s_dev", u32, 16 * 8)])
    kuid = b.struct_("", 4, [("val", u32, 0)])  # kuid_t is a typedef'd anonymous struct
    kuid_t = b.typedef("kuid_t", kuid)
    anon = b.struct_("", 8, [("tgid", u32, 0), ("pid_pad", u32, 32)], union=False)
    task: List[Member] = [("real_parent", vp, 1280 * 8), ("", anon, 1268 * 8)]
    if audit:
        task.append(("loginuid", kuid_t, 1952 * 8))
    b.struct_("task_struct", 3000, task)
    inode: List[Member] = [("i_sb", vp, 40 * 8), ("i_ino", u64, 64 * 8), ("i_size", u64, 80 * 8)]
    if new_ctime:
        inode += [("i_ctime_sec", s64, 104 * 8), ("i_ctime_nsec", u32, 120 * 8)]
    else:
        ts = b.struct_("timespec64", 16, [("tv_sec", s64, 0), ("tv_nsec", u64, 64)])
        inode += [("i_ctime", ts, 112 * 8)]
    b.struct_("inode", 600, inode)
    return b.blob()


EXPECT_COMMON: Dict[str, int] = {
    "EG_OFF_BPRM_FILE": 64, "EG_OFF_BPRM_FILENAME": 96, "EG_OFF_BPRM_INTERP": 104,
    "EG_OFF_FILE_INODE": 32,
    "EG_OFF_INODE_INO": 64, "EG_OFF_INODE_SB": 40, "EG_OFF_INODE_SIZE": 80, "EG_OFF_SB_DEV": 16,
    "EG_OFF_TASK_REAL_PARENT": 1280, "EG_OFF_TASK_TGID": 1268, "EG_OFF_TASK_LOGINUID": 1952,
}  # fmt: skip


def test_offsets_with_split_ctime_and_anonymous_member() -> None:
    got = exec_sensor_offsets(Btf(kernel_like(new_ctime=True), "synthetic"))
    assert got == {**EXPECT_COMMON, "EG_OFF_INODE_CTIME_SEC": 104,
                   "EG_OFF_INODE_CTIME_NSEC": 120, "EG_SZ_INODE_CTIME_NSEC": 4}  # fmt: skip


def test_offsets_with_timespec64_ctime() -> None:
    got = exec_sensor_offsets(Btf(kernel_like(new_ctime=False), "synthetic"))
    assert got["EG_OFF_INODE_CTIME_SEC"] == 112
    assert (got["EG_OFF_INODE_CTIME_NSEC"], got["EG_SZ_INODE_CTIME_NSEC"]) == (120, 8)


def test_kernel_without_audit_has_no_loginuid_offset() -> None:
    blob = kernel_like(new_ctime=True, audit=False)
    got = exec_sensor_offsets(Btf(blob, "synthetic"))
    assert "EG_OFF_TASK_LOGINUID" not in got and got["EG_OFF_TASK_TGID"] == 1268


def test_missing_struct_or_member_names_it() -> None:
    b = BtfBuilder()
    b.struct_("file", 8, [("f_inode", b.ptr(0), 0)])
    btf = Btf(b.blob(), "tiny.btf")
    assert btf.field("file", "nope") is None
    with pytest.raises(LayoutError, match=r"tiny\.btf: struct file has no member f_mode"):
        btf.require("file", "f_mode")
    with pytest.raises(LayoutError, match="no struct linux_binprm"):
        exec_sensor_offsets(btf)


def test_wrong_field_size_and_bitfield_are_errors() -> None:
    b = BtfBuilder()
    u16 = b.int_("short unsigned int", 2)
    b.struct_("super_block", 8, [("s_dev", u16, 0)])
    b.struct_("bits", 4, [("flag", u16, (3 << 24) | 5)], kind_flag=1)
    btf = Btf(b.blob())
    with pytest.raises(LayoutError, match=r"s_dev is 2 bytes, expected \(4,\)"):
        btf.require("super_block", "s_dev", 4)
    with pytest.raises(LayoutError, match="bitfield"):
        btf.field("bits", "flag")


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (BtfBuilder().blob(magic=0x9FEB), "not BTF"),
        (b"\x9f\xeb", "malformed"),
        (kernel_like(True)[:300], "malformed|no struct"),
    ],
)
def test_bad_blobs_raise_layout_error(blob: bytes, match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        exec_sensor_offsets(Btf(blob, "bad.btf"))


def test_unreadable_file_names_it(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(LayoutError, match="cannot read kernel BTF"):
        Btf.load(os.path.join(tmp_path, "absent"))


def test_this_kernels_btf() -> None:
    """The real vmlinux BTF of the test host parses and has every field the sensor reads."""
    got = exec_sensor_offsets(Btf.load(VMLINUX_BTF))
    assert set(EXPECT_COMMON) < set(got)
    assert got["EG_SZ_INODE_CTIME_NSEC"] in (4, 8)


@pytest.mark.parametrize("new_ctime", [True, False])
def test_corrupted_blobs_only_ever_raise_layout_error(new_ctime: bool) -> None:
    """Byte flips and truncations: a clear LayoutError or a result, never another exception."""
    rnd = random.Random(7)
    base = kernel_like(new_ctime)
    for _ in range(1500):
        blob = bytearray(base)
        for _ in range(rnd.randint(1, 4)):
            blob[rnd.randrange(len(blob))] = rnd.randrange(256)
        if rnd.random() < 0.3:
            blob = blob[: rnd.randrange(len(blob))]
        with contextlib.suppress(LayoutError):
            exec_sensor_offsets(Btf(bytes(blob), "fuzz"))
