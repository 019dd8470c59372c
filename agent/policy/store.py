"""The current policy, swapped whole: a reload builds a complete snapshot, then swaps.

Deciders take ``store.current`` once per decision and use that snapshot throughout, so a
reload never waits for decisions in flight and no decision sees two policies.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from agent.errors import ExecguardError
from agent.policy.model import PolicySnapshot


@dataclass(frozen=True)
class Generation:
    snapshot: PolicySnapshot
    number: int  # 1 for the first policy, +1 per successful reload
    loaded_at: float  # time.time() of the swap


class PolicyStore:
    def __init__(self, first: PolicySnapshot) -> None:
        self._current = Generation(first, 1, time.time())
        self._reload_lock = threading.Lock()  # serializes reloads only, never decisions

    @property
    def current(self) -> Generation:
        return self._current  # one reference read: atomic

    def reload(self, load: Callable[[], PolicySnapshot]) -> Generation:
        """Swap in ``load()``; if it raises ``ExecguardError`` the old policy stays, and the
        error propagates for the caller to log."""
        with self._reload_lock:
            snapshot = load()  # may raise: nothing has changed yet
            self._current = Generation(snapshot, self._current.number + 1, time.time())
            return self._current

    def try_reload(self, load: Callable[[], PolicySnapshot]) -> ExecguardError | None:
        """``reload`` that returns the error instead of raising it."""
        try:
            self.reload(load)
        except ExecguardError as exc:
            return exc
        return None
