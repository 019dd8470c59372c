"""The textfile writer on a real filesystem: atomic replacement under a concurrent reader,
permissions, the ticker, failures counted, the agent's last word."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path
from typing import List

import pytest

from agent.metrics.config import MetricsConfig, check_config
from agent.metrics.textfile import TextfileError, TextfileWriter, check_path, write_atomically


def payload(i: int) -> bytes:
    # big enough that a non-atomic writer would be caught half-way: several write() calls
    line = f"execguard_test{{n=\"{i}\"}} {i}\n".encode()
    return line * 20000 + f"# END {i}\n".encode()


def test_readers_only_ever_see_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "execguard.prom"
    write_atomically(str(target), payload(0))
    stop = threading.Event()
    seen: List[int] = []
    torn: List[bytes] = []

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            last = data.rsplit(b"\n", 2)[-2]
            if not last.startswith(b"# END "):
                torn.append(data[-80:])
                continue
            n = int(last.split()[-1])
            if data != payload(n):
                torn.append(data[-80:])
            seen.append(n)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(1, 60):
            write_atomically(str(target), payload(i))
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not torn, f"a reader saw a partial file: {torn[:3]}"
    assert len(set(seen)) > 5  # the readers really overlapped the writes
    assert [p.name for p in tmp_path.iterdir()] == ["execguard.prom"]  # no temporary left


def test_mode_ignores_the_umask_and_symlinks_are_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "x.prom"
    old = os.umask(0o077)
    try:
        write_atomically(str(target), b"a 1\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    # a symlink planted at the temporary name is removed, never written through
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / f".x.prom.{os.getpid()}.tmp").symlink_to(victim)
    write_atomically(str(target), b"a 2\n")
    assert victim.read_text() == "keep" and target.read_bytes() == b"a 2\n"


def test_path_and_interval_are_checked() -> None:
    with pytest.raises(TextfileError, match=r"must end in \.prom"):
        check_path("/var/lib/node_exporter/execguard.txt")
    with pytest.raises(TextfileError, match=r"must end in \.prom"):
        check_config(MetricsConfig(textfile="/tmp/.prom"))
    with pytest.raises(TextfileError, match="at least"):
        check_config(MetricsConfig(textfile="/tmp/a.prom", interval_s=0.1))
    assert check_path("rel.prom") == os.path.abspath("rel.prom")


def test_ticker_triggers_writes_on_its_own_thread_and_counts_errors(tmp_path: Path) -> None:
    target = tmp_path / "m.prom"
    renders = {"n": 0}

    def render() -> bytes:
        renders["n"] += 1
        return f"execguard_up 1\nn {renders['n']}\n".encode()

    w = TextfileWriter(str(target), render, 1.0)
    w.start()
    try:
        now = time.monotonic()
        started = time.monotonic()
        w.tick(now)  # due at once
        assert time.monotonic() - started < 0.05  # the tick only signals
        deadline = time.monotonic() + 5
        while w.stats()["writes"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert target.read_text() == "execguard_up 1\nn 1\n"
        w.tick(now + 0.5)  # not due yet
        time.sleep(0.2)
        assert w.stats()["writes"] == 1
        w.tick(now + 1.0)
        deadline = time.monotonic() + 5
        while w.stats()["writes"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert target.read_text().endswith("n 2\n")
    finally:
        w.close(final=lambda: b"execguard_up 0\n")
    assert target.read_text() == "execguard_up 0\n"  # the last word after a clean stop

    missing = TextfileWriter(str(tmp_path / "no" / "such.prom"), render, 1.0)
    assert missing.write_now() is False
    st = missing.stats()
    assert st["errors"] == 1 and "FileNotFoundError" in str(st["last_error"])
