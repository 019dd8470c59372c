"""When an event loop last made progress: the service watchdog's proof that a loop turns.

A loop that answers exec events (fanotify, a BPF ring poll) calls ``beat()`` on every turn
and after every event it handles; the systemd watchdog (agent/service.py) stops its pings
when a loop has been silent too long. A beat is one float store: cheap enough for every
event.
"""

from __future__ import annotations

import threading
import time
from typing import Optional


class Heartbeat:
    def __init__(self, name: str) -> None:
        self.name = name
        self.at = time.monotonic()
        self.tid: Optional[int] = None  # the beating thread's kernel id, for diagnostics

    def beat(self) -> None:
        if self.tid is None:
            self.tid = threading.get_native_id()
        self.at = time.monotonic()

    def silent_for(self, now: Optional[float] = None) -> float:
        return (time.monotonic() if now is None else now) - self.at

    def check(self, max_silence_s: float, now: Optional[float] = None) -> Optional[str]:
        """None while the loop beats, else why it does not."""
        silent = self.silent_for(now)
        if silent <= max_silence_s:
            return None
        return f"{self.name} loop silent for {silent:.1f}s"
