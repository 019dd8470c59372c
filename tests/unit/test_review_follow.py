"""The log follower on real files rotated by the real Recorder: every record once, in order,
through rotations, deleted files whose inode numbers come back, and a concurrent writer."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import List

from agent.record import LogFormatError, Recorder, RecorderConfig
from agent.record.decision_log import to_line
from agent.review import Follower
from tests.record_fixtures import make_decision

LINE = len(to_line("x" * 19, make_decision(0)))


def test_every_record_once_when_each_record_rotates(tmp_path: Path) -> None:
    """keep=1: every record rotates the file and deletes the older one, so inode numbers
    are freed and reused; a file is still told apart by its first record."""
    errors: List[LogFormatError] = []
    rec = Recorder(RecorderConfig(str(tmp_path), audit="off", max_bytes=LINE, keep=1))
    rec.start()
    follower = Follower(str(tmp_path), errors.append)
    ids, seen, inodes = [], [], set()
    try:
        for i in range(150):
            ids.append(rec.decision(make_decision(i)))
            assert rec.flush(10)
            inodes.add(os.stat(tmp_path / "decisions.jsonl").st_ino)
            seen += [r.id for r in follower.poll()]
    finally:
        rec.close(10)
        follower.close()
    assert seen == ids and errors == []
    assert len(inodes) < 150, "the file system never reused an inode: the case is untested"


def test_concurrent_writer_loses_nothing(tmp_path: Path) -> None:
    rec = Recorder(RecorderConfig(str(tmp_path), audit="off", max_bytes=LINE * 4, keep=1000))
    rec.start()
    errors: List[LogFormatError] = []
    follower = Follower(str(tmp_path), errors.append)
    ids: List[str] = []
    done = threading.Event()

    def write() -> None:
        try:
            for i in range(1000):
                ids.append(rec.decision(make_decision(i)))
        finally:
            rec.close(30)
            done.set()

    t = threading.Thread(target=write)
    t.start()
    seen: List[str] = []
    try:
        while not done.is_set():
            seen += [r.id for r in follower.poll()]
        seen += [r.id for r in follower.poll()]
    finally:
        t.join(60)
        follower.close()
    assert errors == []
    assert len(seen) == len(set(seen)) == 1000
    assert set(seen) == set(ids)


def test_from_start_reads_history_then_new(tmp_path: Path) -> None:
    rec = Recorder(RecorderConfig(str(tmp_path), audit="off", max_bytes=LINE * 2, keep=10))
    rec.start()
    first = [rec.decision(make_decision(i)) for i in range(7)]
    assert rec.flush(10)
    follower = Follower(str(tmp_path), lambda e: None, from_start=True)
    assert [r.id for r in follower.poll()] == first
    later = [rec.decision(make_decision(10 + i)) for i in range(3)]
    rec.close(10)
    assert [r.id for r in follower.poll()] == later
    assert follower.poll() == []
    follower.close()


def test_truncated_in_place_is_read_again(tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    log.write_bytes(to_line("a" * 19, make_decision(0)) * 3)
    follower = Follower(str(tmp_path), lambda e: None)
    assert follower.poll() == []
    with open(log, "r+b") as fh:  # copytruncate, then a new record
        fh.truncate(0)
    with open(log, "ab") as fh:
        fh.write(to_line("b" * 19, make_decision(1)))
    assert [r.id for r in follower.poll()] == ["b" * 19]
    follower.close()


def test_torn_last_line_of_a_rotated_file_is_reported(tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    errors: List[LogFormatError] = []
    log.write_bytes(b"")
    follower = Follower(str(tmp_path), errors.append)
    line = to_line("c" * 19, make_decision(0))
    with open(log, "ab") as fh:
        fh.write(line + line[:30])
    assert [r.id for r in follower.poll()] == ["c" * 19]
    os.replace(log, tmp_path / "decisions.jsonl.1")
    log.write_bytes(to_line("d" * 19, make_decision(1)))
    assert [r.id for r in follower.poll()] == ["d" * 19]
    assert len(errors) == 1 and "line 2: cut short" in str(errors[0])
    follower.close()
