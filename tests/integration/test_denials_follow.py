"""``execguard denials --follow`` as a subprocess while the real Recorder appends and rotates
the log under it (several rotations between two polls included). Every run has a deadline
and the process is killed in ``finally``."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, List

from agent.errors import Reason
from agent.record.decision_log import log_files, to_line
from tests.record_fixtures import make_decision
from tests.review_fixtures import ENTRY, write_log

DEADLINE_S = 30.0
LINE = len(to_line("x" * 19, make_decision(0)))


class Follow:
    """The CLI in follow mode, its stdout and stderr read by threads into queues."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*ENTRY, "denials", "--follow", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        self.stderr_seen: List[str] = []
        for stream, q in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, q), daemon=True).start()

    @staticmethod
    def _pump(stream: IO[str] | None, q: queue.Queue[str]) -> None:
        assert stream is not None
        for line in stream:
            q.put(line.rstrip("\n"))

    def wait_stderr(self, needle: str) -> str:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            try:
                line = self.err.get(timeout=0.1)
            except queue.Empty:
                assert self.proc.poll() is None, f"exited {self.proc.returncode}"
                continue
            self.stderr_seen.append(line)
            if needle in line:
                return line
        raise AssertionError(f"{needle!r} not on stderr within {DEADLINE_S} s: "
                             f"{self.stderr_seen}")

    def lines(self, n: int) -> List[str]:
        got: List[str] = []
        deadline = time.monotonic() + DEADLINE_S
        while len(got) < n:
            left = deadline - time.monotonic()
            assert left > 0, f"only {len(got)} of {n} lines within {DEADLINE_S} s: {got}"
            try:
                got.append(self.out.get(timeout=min(left, 0.5)))
            except queue.Empty:
                assert self.proc.poll() is None, f"exited {self.proc.returncode}"
        return got

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=DEADLINE_S)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=DEADLINE_S)


def test_follow_sees_new_records_across_rotations(tmp_path: Path) -> None:
    old = write_log(tmp_path, [make_decision(i) for i in range(5)], max_bytes=LINE * 3,
                    keep=20)
    f = Follow("--log-dir", str(tmp_path), "--json")
    try:
        f.wait_stderr("following")
        new = write_log(tmp_path, [make_decision(10)], max_bytes=LINE * 3, keep=20)
        assert [json.loads(x)["id"] for x in f.lines(1)] == new
        # a burst: several rotations happen before the follower looks again
        before = len(log_files(str(tmp_path)))
        burst = write_log(tmp_path, [make_decision(20 + i) for i in range(14)],
                          max_bytes=LINE * 3, keep=20)
        assert len(log_files(str(tmp_path))) >= before + 3
        assert [json.loads(x)["id"] for x in f.lines(14)] == burst
        # a corrupt line is reported with file:line and skipped
        with open(tmp_path / "decisions.jsonl", "ab") as fh:
            fh.write(b"{garbage\n")
        after = write_log(tmp_path, [make_decision(40), make_decision(41, allow=True),
                                     make_decision(42)], max_bytes=LINE * 3, keep=20)
        assert [json.loads(x)["id"] for x in f.lines(2)] == [after[0], after[2]]  # no allow
        f.wait_stderr("decisions.jsonl: line ")
        assert f.stop() == 0
        assert f.out.empty()
        assert not set(old) & set(new + burst + after)
    finally:
        f.kill()


def test_follow_since_starts_with_the_history_and_filters(tmp_path: Path) -> None:
    history = [make_decision(i, reason=Reason.BAD_SIGNATURE if i % 2 else Reason.NO_SIGNATURE)
               for i in range(6)]
    ids = write_log(tmp_path, history, max_bytes=LINE * 2, keep=20)
    f = Follow("--log-dir", str(tmp_path), "--since", "2000-01-01", "--reason",
               "bad-signature")
    try:
        f.wait_stderr("following")
        header, *rows = f.lines(4)
        assert header.split()[:3] == ["ID", "TIME", "DECISION"]
        assert [r.split()[0] for r in rows] == [ids[1], ids[3], ids[5]]
        more = write_log(tmp_path, [make_decision(7, reason=Reason.BAD_SIGNATURE),
                                    make_decision(8)], max_bytes=LINE * 2, keep=20)
        (row,) = f.lines(1)
        assert row.split()[0] == more[0] and "bad-signature" in row
        assert f.stop(signal.SIGTERM) == 0
    finally:
        f.kill()


def test_follow_waits_for_a_log_that_does_not_exist_yet(tmp_path: Path) -> None:
    f = Follow("--log-dir", str(tmp_path), "--csv")
    try:
        f.wait_stderr("following")
        (header,) = f.lines(1)
        assert header.startswith("id,time,decision")
        new = write_log(tmp_path, [make_decision(1)])
        (row,) = f.lines(1)
        assert row.startswith(new[0] + ",")
        assert f.stop() == 0
    finally:
        f.kill()


def test_follow_with_nothing_new_exits_1(tmp_path: Path) -> None:
    write_log(tmp_path, [make_decision(0)])
    f = Follow("--log-dir", str(tmp_path), "--json")
    try:
        f.wait_stderr("following")
        assert f.stop() == 1
    finally:
        f.kill()
