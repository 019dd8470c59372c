"""The ring-record decoder: pure bytes in, typed records out, bad input counted never raised."""

from __future__ import annotations

import os
import random
import struct

import pytest

from agent.sensors import decode
from agent.sensors.decode import KernelAction, KernelState, RecordDecoder


def record(
    *,
    op: int = decode.EG_MSG_EXEC,
    state: int = 0,
    action: int = 0,
    flags: int = 0,
    kill_err: int = 0,
    kdev: int = (259 << 20) | 1,
    comm: bytes = b"sh",
    path: bytes = b"/usr/bin/sh",
    path_len: int = 256,
) -> bytes:
    head = decode.EXEC_HEAD.pack(
        op, state, action, flags, kill_err, 10, 9, 1000, 0xFFFFFFFF, kdev, 1001, 42, 7, 99, 1000
    )
    return head + comm.ljust(16, b"\0") + path.ljust(path_len, b"\0")


def test_exec_record_decodes_every_field() -> None:
    dec = RecordDecoder(realtime_offset_ns=5_000, backend="kill")
    rec = dec.decode(record())
    assert rec is not None
    ev = rec.event
    assert (ev.pid, ev.ppid, ev.uid, ev.auid, ev.comm, ev.path) == (
        10, 9, 1000, 0xFFFFFFFF, "sh", "/usr/bin/sh",
    )  # fmt: skip
    assert ev.gid == 1001  # the real gid, from the former padding word
    assert ev.identity.dev == os.makedev(259, 1)
    assert (ev.identity.ino, ev.identity.ctime_ns, ev.identity.size) == (42, 7, 99)
    assert ev.timestamp_ns == 6_000 and ev.backend == "kill"
    assert (rec.state, rec.action, rec.in_scope, rec.denied, rec.read_error) == (
        KernelState.UNKNOWN, KernelAction.NONE, False, False, False,
    )  # fmt: skip
    assert dec.stats.decoded == 1 and dec.stats.by_op == {decode.EG_MSG_EXEC: 1}


def test_flags_state_action_and_kill_errno() -> None:
    flags = decode.F_IN_SCOPE | decode.F_DENIED | decode.F_READ_ERR
    rec = RecordDecoder(0).decode(record(state=3, action=2, flags=flags, kill_err=-1))
    assert rec is not None
    assert (rec.state, rec.action) == (KernelState.STALE, KernelAction.KILL_FAILED)
    assert rec.kill_errno == 1
    assert rec.in_scope and rec.denied and rec.read_error


def test_out_of_range_enums_fail_safe() -> None:
    """A newer program's values: an unknown state is unknown; an unknown action is never 'none'."""
    rec = RecordDecoder(0).decode(record(state=9, action=7))
    assert rec is not None
    assert rec.state == KernelState.UNKNOWN and rec.action == KernelAction.KILL_FAILED


@pytest.mark.parametrize("data", [b"", bytes([decode.EG_MSG_EXEC]), record()[:79]])
def test_short_records_are_counted_not_raised(data: bytes) -> None:
    dec = RecordDecoder(0)
    assert dec.decode(data) is None
    assert (dec.stats.short, dec.stats.decoded) == (1, 0)


def test_unknown_opcode_is_counted() -> None:
    dec = RecordDecoder(0)
    assert dec.decode(record(op=0)) is None
    assert dec.decode(record(op=200)) is None
    assert dec.stats.unknown_op == 2 and dec.stats.short == 0


def test_path_shorter_buffer_and_unterminated_strings() -> None:
    """EG_PATH_LEN is a knob: any path length decodes; a full buffer has no NUL."""
    rec = RecordDecoder(0).decode(record(path=b"/x", path_len=8, comm=b"c" * 16))
    assert rec is not None and rec.event.path == "/x" and rec.event.comm == "c" * 16
    rec = RecordDecoder(0).decode(record(path=b"/abcdefg", path_len=8))
    assert rec is not None and rec.event.path == "/abcdefg"
    rec = RecordDecoder(0).decode(record(path=b"", path_len=0))
    assert rec is not None and rec.event.path == ""


def test_undecodable_path_bytes_survive() -> None:
    rec = RecordDecoder(0).decode(record(path=b"/tmp/\xff\xfe"))
    assert rec is not None
    assert os.fsencode(rec.event.path) == b"/tmp/\xff\xfe"


@pytest.mark.parametrize(
    ("major", "minor"), [(0, 0), (0, 45), (8, 1), (259, 3), (0, 256), (0, 0x12345), (4095, 0xFFFFF)]
)
def test_dev_round_trip_kernel_and_stat_encodings(major: int, minor: int) -> None:
    kdev = (major << 20) | minor
    st_dev = decode.kernel_dev_to_st_dev(kdev)
    assert (os.major(st_dev), os.minor(st_dev)) == (major, minor)
    assert decode.st_dev_to_kernel_dev(st_dev) == kdev


def test_dev_encoding_differs_from_stat_for_real_devices() -> None:
    """Kernel MKDEV (major<<20|minor) is not stat()'s new_encode_dev (major<<8|minor...)."""
    assert decode.kernel_dev_to_st_dev((8 << 20) | 1) == 0x801
    assert decode.kernel_dev_to_st_dev((0 << 20) | 0x123) == 0x100023  # minor's high bits move up


def test_dev_that_does_not_fit_the_kernel_encoding_is_rejected() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        decode.st_dev_to_kernel_dev(os.makedev(4096, 0))
    with pytest.raises(ValueError, match="does not fit"):
        decode.st_dev_to_kernel_dev(os.makedev(0, 1 << 20))


def test_head_layout_constants() -> None:
    assert decode.EXEC_HEAD.size == 64 == decode.EXEC_FIELDS["comm"]
    assert decode.EXEC_MIN_LEN == 80 == decode.EXEC_FIELDS["path"]
    assert struct.calcsize("<BBBBi") == decode.EXEC_FIELDS["pid"]


def test_random_bytes_never_raise() -> None:
    rnd = random.Random(3)
    dec = RecordDecoder(0)
    good = record()
    for _ in range(3000):
        data = bytearray(good[: rnd.randrange(len(good) + 1)])
        for _ in range(rnd.randint(0, 6)):
            if data:
                data[rnd.randrange(len(data))] = rnd.randrange(256)
        dec.decode(bytes(data))
    s = dec.stats
    assert s.decoded + s.short + s.unknown_op == 3000
