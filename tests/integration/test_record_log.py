"""The JSON-lines decision log on real files: rotation, a full disk (a tiny tmpfs), a full
queue, and round trips through the Recorder. Recording never blocks and never raises."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import List, Tuple

from agent.record import LogFormatError, LoggedDecision, Recorder, RecorderConfig
from agent.record.decision_log import LOG_NAME, log_files, to_line
from agent.review.sources import read_records
from tests.record_fixtures import make_decision, tiny_tmpfs


def _read(log_dir: str) -> Tuple[List[LoggedDecision], List[LogFormatError]]:
    errors: List[LogFormatError] = []
    return list(read_records(log_files(log_dir), errors.append)), errors


def test_records_round_trip_through_the_recorder(tmp_path: Path) -> None:
    rec = Recorder(RecorderConfig(str(tmp_path), audit="off"))
    rec.start()
    decisions = [make_decision(i, allow=i % 3 == 0, full=i % 2 == 0) for i in range(50)]
    try:
        ids = [rec.decision(d) for d in decisions]
    finally:
        assert rec.close(10)
    assert len(set(ids)) == len(ids)
    records, errors = _read(str(tmp_path))
    assert errors == []
    assert [r.id for r in records] == ids
    assert [r.decision for r in records] == decisions
    assert rec.stats()["decision_log"]["written"] == 50
    assert rec.stats()["audit"] == {"enabled": False, "note": "disabled by configuration"}
    # one object per line, documented top-level keys
    with open(tmp_path / LOG_NAME, "rb") as fh:
        first = json.loads(fh.readline())
    assert first["decision"] == "allow" and first["id"] == ids[0]
    assert first["time"].endswith("Z") and first["event"]["comm"] == "tool"
    assert os.stat(tmp_path / LOG_NAME).st_mode & 0o777 == 0o600


def test_rotation_by_size_keeps_n_files(tmp_path: Path) -> None:
    line_len = len(to_line("x" * 19, make_decision(0)))
    rec = Recorder(RecorderConfig(str(tmp_path), audit="off", max_bytes=line_len * 10, keep=3))
    rec.start()
    try:
        ids = [rec.decision(make_decision(i)) for i in range(100)]
    finally:
        assert rec.close(10)
    files = log_files(str(tmp_path))
    assert [os.path.basename(f) for f in files] == [
        f"{LOG_NAME}.3", f"{LOG_NAME}.2", f"{LOG_NAME}.1", LOG_NAME]
    for f in files:
        assert os.path.getsize(f) <= line_len * 10 + 16
    records, errors = _read(str(tmp_path))
    assert errors == []
    kept = [r.id for r in records]
    assert kept == ids[-len(kept):]  # the newest records, in order, none torn
    assert 30 <= len(kept) <= 40
    assert rec.stats()["decision_log"]["written"] == 100
    # a later agent told to keep fewer (--log-keep 1) drops the older ones at its rotation
    rec = Recorder(RecorderConfig(str(tmp_path), audit="off", max_bytes=line_len * 10, keep=1))
    rec.start()
    try:
        for i in range(20):
            rec.decision(make_decision(i))
    finally:
        assert rec.close(10)
    assert [os.path.basename(f) for f in log_files(str(tmp_path))] == [f"{LOG_NAME}.1",
                                                                       LOG_NAME]


def test_full_disk_drops_and_counts(tmp_path: Path) -> None:
    with tiny_tmpfs("64k") as where:
        rec = Recorder(RecorderConfig(where, audit="off", max_bytes=1 << 30))
        rec.start()
        n = 400  # ~1 KiB each: several times what the tmpfs holds
        try:
            t0 = time.monotonic()
            for i in range(n):
                rec.decision(make_decision(i))
            assert time.monotonic() - t0 < 2.0, "recording must never wait for the disk"
        finally:
            assert rec.close(10)
        stats = rec.stats()["decision_log"]
        assert stats["written"] + stats["dropped"] == n
        assert stats["dropped_by_cause"].get("disk-full", 0) > 0
        assert stats["written"] > 10
        assert "No space left on device" in stats["last_error"]
        records, errors = _read(where)
        assert errors == []  # the short write was cut back: no torn line
        assert len(records) == stats["written"]
        # space comes back: writing resumes
        os.unlink(os.path.join(where, LOG_NAME))
        again = Recorder(RecorderConfig(where, audit="off"))
        again.start()
        again.decision(make_decision(1))
        assert again.close(10)
        assert again.stats()["decision_log"]["written"] == 1


def test_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    rec = Recorder(RecorderConfig(str(tmp_path), audit="off", queue_size=8))
    # the writer thread is not running yet: the queue fills and stays full
    t0 = time.monotonic()
    ids = [rec.decision(make_decision(i)) for i in range(100)]
    assert time.monotonic() - t0 < 1.0
    assert rec.stats()["decision_log"]["dropped_by_cause"] == {"queue-full": 92}
    rec.start()
    assert rec.close(10)
    records, _ = _read(str(tmp_path))
    assert [r.id for r in records] == ids[:8]
    assert rec.dropped_total() == 92


def test_torn_and_foreign_lines_are_reported_not_fatal(tmp_path: Path) -> None:
    good = to_line("0" * 19, make_decision(1))
    (tmp_path / f"{LOG_NAME}.1").write_bytes(good + b'{"v": 1, "id": "x"}\n')
    (tmp_path / LOG_NAME).write_bytes(b"\n" + good[:40] + b"\n" + good + b"not json\n")
    records, errors = _read(str(tmp_path))
    assert len(records) == 2
    # json's own wording differs between Python versions: check what is ours
    got = [str(e) for e in errors]
    assert got[0] == f"{tmp_path}/{LOG_NAME}.1: line 2: missing field 'event'"
    assert got[1].startswith(f"{tmp_path}/{LOG_NAME}: line 2: not JSON (")
    assert got[2].startswith(f"{tmp_path}/{LOG_NAME}: line 4: not JSON (")
    assert len(got) == 3
