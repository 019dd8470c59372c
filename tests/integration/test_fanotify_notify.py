"""The BCC-free audit-only sensor: fanotify notification events for each exec in scope."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import List, Tuple

import pytest

from agent.decision import ExecEvent
from agent.sensors.fanotify_notify import FAN_OPEN_EXEC, ExecNotifier
from tests.agent_fixtures import scoped_tmpfs

pytestmark = pytest.mark.timeout(60)


def test_each_exec_in_scope_is_reported_with_its_identity(tmp_path: Path) -> None:
    seen: List[Tuple[ExecEvent, os.stat_result]] = []
    lock = threading.Lock()

    def on_exec(event: ExecEvent, fd: int) -> None:
        with lock:
            seen.append((event, os.fstat(fd)))

    with scoped_tmpfs("16m") as scope:
        (scope / "app").mkdir()
        canary = scope / "app" / "true"
        shutil.copy("/bin/true", canary)
        notifier = ExecNotifier([str(scope / "app")], on_exec)
        notifier.start()
        try:
            assert notifier.mask == FAN_OPEN_EXEC  # Linux 5.0+ here
            for _ in range(3):
                subprocess.run([str(canary)], check=True, timeout=10)
            subprocess.run(["/bin/true"], check=True, timeout=10)  # another mount: unseen
            (scope / "other").mkdir()
            shutil.copy("/bin/true", scope / "other" / "true")
            subprocess.run([str(scope / "other" / "true")], check=True, timeout=10)
            deadline = time.monotonic() + 10
            while len(seen) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # anything else would have arrived by now
        finally:
            notifier.stop()
        st = os.stat(canary)
        assert len(seen) == 3, [e.path for e, _ in seen]
        for event, fst in seen:
            assert event.path == str(canary) and event.backend == "audit-only"
            assert (event.identity.dev, event.identity.ino) == (st.st_dev, st.st_ino)
            assert (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino)
        assert notifier.counts["out_of_scope"] == 1
