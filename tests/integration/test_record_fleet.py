"""What a fleet collects from `execguard run`: every decision record names the host that wrote
it, and the decision log rotates at the size and count the operator set (``--log-max-size``,
``--log-keep``), not at fixed values. A real agent (fanotify-exec, monitor mode) scoped to a
tmpfs the test owns."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from agent.hostid import record_host
from tests.agent_fixtures import exec_file, running_agent, scoped_tmpfs, wait_for

pytestmark = pytest.mark.timeout(180)
FILES = 40


def test_records_name_the_host_and_rotate_where_the_operator_said(tmp_path: Path) -> None:
    with scoped_tmpfs("32m") as scope:
        copies = []
        for i in range(FILES):  # distinct files: an allowed file's later execs are not events
            copies.append(scope / f"true-{i}")
            shutil.copy("/bin/true", copies[-1])
            copies[-1].chmod(0o755)
        with running_agent(tmp_path, "--backend", "fanotify-exec", "--mode", "monitor",
                           "--scope", str(scope), "--audit", "off", "--quiet", "--no-prewarm",
                           "--log-max-size", "4K", "--log-keep", "2"):
            for path in copies:
                assert exec_file(path).returncode == 0
            logs = tmp_path / "log"
            wait_for(lambda: (logs / "decisions.jsonl.2").exists()
                     and str(copies[-1]) in (logs / "decisions.jsonl").read_text(), 30)
    names = sorted(p.name for p in (tmp_path / "log").iterdir())
    assert names == ["decisions.jsonl", "decisions.jsonl.1", "decisions.jsonl.2"], names
    records = []
    for path in (tmp_path / "log").iterdir():
        assert path.stat().st_size <= 4096, (path, path.stat().st_size)
        records += [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) < FILES  # the oldest went with the third rotation
    host = record_host()
    assert host["hostname"] == socket.gethostname()
    assert all(r["host"] == host for r in records), records[0]["host"]
