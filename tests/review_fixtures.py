"""Real decision logs for the review tests, written by the real Recorder, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from agent.decision import Decision
from agent.record import Recorder, RecorderConfig

ENTRY = [sys.executable, "-m", "agent"]


def write_log(log_dir: Path, decisions: Sequence[Decision], max_bytes: int = 16 << 20,
              keep: int = 5) -> List[str]:
    """Record ``decisions`` through a Recorder (decision log only); returns their ids."""
    rec = Recorder(RecorderConfig(str(log_dir), audit="off", max_bytes=max_bytes, keep=keep))
    rec.start()
    try:
        ids = [rec.decision(d) for d in decisions]
    finally:
        assert rec.close(10)
    return ids


def denials(*args: str, cwd: Optional[Path] = None,
            timeout: float = 60) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    """``execguard denials ARGS`` as a subprocess (the installed entry point)."""
    return subprocess.run([*ENTRY, "denials", *args], capture_output=True, text=True,
                          cwd=cwd, stdin=subprocess.DEVNULL, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
