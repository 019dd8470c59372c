"""The exposition as a file for node_exporter's textfile collector, replaced atomically.

The daemon's ticker only says "due"; rendering and writing happen on this module's own
thread, so a slow or stuck disk never holds up the agent's main loop. Each write goes to a
hidden temporary file in the same directory (node_exporter reads only ``*.prom``) and is
renamed over the target, so a reader sees the old file or the new one, never a partial one.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Callable, Dict, Optional

from agent.errors import ExecguardError

MIN_INTERVAL_S = 1.0


class TextfileError(ExecguardError):
    """A --metrics-textfile value that cannot work."""


def check_path(path: str) -> str:
    """The absolute target path; node_exporter only reads files named ``*.prom``."""
    if not path.endswith(".prom") or os.path.basename(path) == ".prom":
        raise TextfileError(f"--metrics-textfile {path}: the name must end in .prom "
                            "(node_exporter's textfile collector reads only those)")
    return os.path.abspath(path)


def write_atomically(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a crash; O_EXCL below refuses anything already there
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask: node_exporter runs as another user
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class TextfileWriter:
    """Writes ``render()`` to ``path`` when ``tick`` finds it due, from its own thread."""

    def __init__(self, path: str, render: Callable[[], bytes], interval_s: float) -> None:
        if not interval_s >= MIN_INTERVAL_S:
            raise TextfileError(f"--metrics-interval {interval_s}: at least {MIN_INTERVAL_S} s")
        self.path = check_path(path)
        self.render = render
        self.interval_s = interval_s
        self._due = threading.Event()
        self._stop = threading.Event()
        self._next = float("-inf")  # the first tick writes at once
        self._lock = threading.Lock()
        self._n: Dict[str, int] = {"writes": 0, "errors": 0}
        self._last_error: Optional[str] = None
        self._last_write: Optional[float] = None
        self._thread = threading.Thread(target=self._run, name="metrics-textfile", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def tick(self, now: float) -> None:
        """From the daemon's main loop (monotonic ``now``): never blocks."""
        if now >= self._next:
            self._next = now + self.interval_s
            self._due.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._due.wait()
            self._due.clear()
            if self._stop.is_set():
                return
            self.write_now()

    def write_now(self, render: Optional[Callable[[], bytes]] = None) -> bool:
        try:
            write_atomically(self.path, (render or self.render)())
        except Exception as exc:  # a full disk, a missing directory, a metrics bug
            with self._lock:
                self._n["errors"] += 1
                self._last_error = f"{self.path}: {type(exc).__name__}: {exc}"
            return False
        with self._lock:
            self._n["writes"] += 1
            self._last_write = time.time()
        return True

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            return dict(self._n, path=self.path, interval_s=self.interval_s,
                        last_write=self._last_write, last_error=self._last_error)

    def close(self, final: Optional[Callable[[], bytes]] = None, timeout: float = 2.0) -> None:
        """Stop the thread; then write ``final`` (the agent's last word) within ``timeout``."""
        self._stop.set()
        self._due.set()
        self._thread.join(timeout)
        if final is None or self._thread.is_alive():  # still stuck in a write: leave it
            return
        last = threading.Thread(target=self.write_now, args=(final,),
                                name="metrics-textfile-final", daemon=True)
        last.start()
        last.join(timeout)
