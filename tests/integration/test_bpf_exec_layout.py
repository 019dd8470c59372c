"""Kernel and user space agree on the record layout (aesthetics §7 item 10).

BCC compiles events.h and hands back ctypes types built from clang's own layout of the
structs; the Python decoder's offsets must equal them. The identity self-test is the second
line of defence at run time.
"""

from __future__ import annotations

import ctypes
import struct

import bcc
import pytest

from agent.sensors import decode
from agent.sensors.bpf_exec import BPF_DIR

pytestmark = pytest.mark.timeout(60)

PROGRAM = b"""
#include "events.h"
BPF_ARRAY(exec_event, struct eg_exec_event, 1);
BPF_HASH(verdict, struct eg_file_key, struct eg_verdict, 1);
BPF_ARRAY(cfg, struct eg_config, 1);
"""


@pytest.fixture(scope="module")
def layout() -> object:
    b = bcc.BPF(text=PROGRAM, cflags=[f"-I{BPF_DIR}"])
    yield b
    b.cleanup()


def test_exec_event_offsets_match_the_decoder(layout: bcc.BPF) -> None:
    leaf = layout[b"exec_event"].Leaf
    names = [name for name, *_ in leaf._fields_ if not name.startswith("_")]
    got = {name: getattr(leaf, name).offset for name in names}
    assert got == decode.EXEC_FIELDS
    assert leaf.comm.offset == decode.EXEC_HEAD.size
    assert leaf.path.offset == decode.EXEC_MIN_LEN
    assert ctypes.sizeof(leaf) == leaf.path.offset + 256 and ctypes.sizeof(leaf) % 8 == 0


def test_decoder_reads_a_record_packed_by_ctypes(layout: bcc.BPF) -> None:
    """Fill the C struct through BCC's type and decode its bytes."""
    leaf = layout[b"exec_event"].Leaf
    ev = leaf(
        op=decode.EG_MSG_EXEC, state=2, action=1, flags=decode.F_IN_SCOPE | decode.F_DENIED,
        kill_err=0, pid=41, ppid=40, uid=1000, auid=1001, dev=(8 << 20) | 3, gid=1002, ino=777,
        ctime_ns=1_700_000_000_123_456_789, size=4096, boot_ns=5,
    )  # fmt: skip
    ev.comm = b"prog"
    ev.path = b"/opt/app/prog"
    rec = decode.RecordDecoder(realtime_offset_ns=100).decode(bytes(ev))
    assert rec is not None
    assert (rec.event.pid, rec.event.ppid, rec.event.uid, rec.event.auid) == (41, 40, 1000, 1001)
    assert rec.event.gid == 1002
    assert rec.event.identity.dev == (8 << 8) | 3  # st_dev of 8:3
    assert (rec.event.identity.ino, rec.event.identity.size) == (777, 4096)
    assert rec.event.identity.ctime_ns == 1_700_000_000_123_456_789
    assert (rec.event.comm, rec.event.path) == ("prog", "/opt/app/prog")
    assert rec.event.timestamp_ns == 105
    assert (rec.state, rec.action) == (decode.KernelState.DENY, decode.KernelAction.KILLED)
    assert rec.in_scope and rec.denied and not rec.read_error


def test_verdict_key_and_value_have_no_hidden_padding(layout: bcc.BPF) -> None:
    tbl = layout[b"verdict"]
    assert ctypes.sizeof(tbl.Key) == 16 and (tbl.Key.ino.offset, tbl.Key.dev.offset) == (0, 8)
    leaf = tbl.Leaf  # struct eg_verdict: what BpfSensor.set_verdict fills by name
    assert ctypes.sizeof(leaf) == 40
    assert (leaf.ctime_ns.offset, leaf.size.offset, leaf.verdict.offset, leaf.epoch.offset,
            leaf.mtime_ns.offset, leaf.flags.offset) == (0, 8, 16, 20, 24, 32)
    assert ctypes.sizeof(layout[b"cfg"].Leaf) == struct.calcsize("<II")
