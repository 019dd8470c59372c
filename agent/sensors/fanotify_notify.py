"""A BCC-free exec sensor for audit-only: fanotify *notification* events, which never block.

FAN_OPEN_EXEC (Linux 5.0+) reports each exec of a file on the scoped mounts; older kernels
(CentOS 7's 3.10) only have FAN_OPEN, filtered here to files with an x bit. The callback
gets the event and an fd of the exec'd file, which it must not close. Used where the BCC
exec sensor cannot load (no BTF, old BCC, lockdown=confidentiality).
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Callable, Dict, Optional, Sequence

from agent.decision import ExecEvent
from agent.sensors import fanotify_scope as scope
from agent.sensors import fanotify_sys as fs
from agent.service.heartbeat import Heartbeat

FAN_OPEN = 0x00000020
FAN_OPEN_EXEC = 0x00001000
FAN_CLASS_NOTIF = 0x00000000

OnExec = Callable[[ExecEvent, int], None]


class ExecNotifier:
    """Calls ``on_exec(event, fd)`` on its own thread for each exec under ``scopes``."""

    def __init__(self, scopes: Sequence[str], on_exec: OnExec,
                 exempt_pids: Sequence[int] = ()) -> None:
        self._scopes = scope.resolve(scopes)
        self._on_exec = on_exec
        self._exempt = {os.getpid(), *exempt_pids}
        self._group = -1
        self.mask = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.heartbeat = Heartbeat("exec-notify")  # each wait: the service watchdog
        self.counts: Dict[str, int] = dict.fromkeys(
            ("events", "reported", "exempt", "out_of_scope", "not_executable", "errors",
             "overflows"), 0)

    @property
    def name(self) -> str:
        return "FAN_OPEN_EXEC" if self.mask == FAN_OPEN_EXEC else "FAN_OPEN"

    def start(self) -> None:
        self._group = fs.fanotify_init(FAN_CLASS_NOTIF | fs.FAN_CLOEXEC | fs.FAN_NONBLOCK,
                                       fs.EVENT_F_FLAGS)
        try:
            for mount in self._scopes.mounts:
                self._mark(mount)
        except OSError:
            os.close(self._group)
            self._group = -1
            raise
        self._thread = threading.Thread(target=self._loop, name="exec-notify", daemon=True)
        self._thread.start()

    def _mark(self, mount: str) -> None:
        flags = fs.FAN_MARK_ADD | fs.FAN_MARK_MOUNT
        for mask in ([self.mask] if self.mask else [FAN_OPEN_EXEC, FAN_OPEN]):
            try:
                fs.fanotify_mark(self._group, flags, mask, fs.AT_FDCWD, mount)
            except OSError as exc:
                if exc.errno == errno.EINVAL and mask == FAN_OPEN_EXEC:
                    continue  # before Linux 5.0: probe by trying, then FAN_OPEN
                raise
            self.mask = mask
            return

    def _loop(self) -> None:
        for events, problem in fs.notification_batches(self._group, self._stop,
                                                       on_turn=self.heartbeat.beat):
            if problem:
                self.counts["errors"] += 1
            for ev in events:
                self._one(ev)

    def _one(self, ev: fs.Event) -> None:
        self.counts["events"] += 1
        if ev.fd < 0:
            self.counts["overflows"] += 1  # FAN_Q_OVERFLOW: the kernel dropped events
            return
        try:
            if ev.pid in self._exempt:
                self.counts["exempt"] += 1
                return
            st = os.fstat(ev.fd)
            if self.mask == FAN_OPEN and not scope.is_executable(st.st_mode):
                self.counts["not_executable"] += 1
                return
            path = os.readlink(f"/proc/self/fd/{ev.fd}")
            if self._scopes.filtered and not any(scope.under(path, d)
                                                 for d in self._scopes.dirs):
                self.counts["out_of_scope"] += 1
                return
            self._on_exec(scope.exec_event(ev.pid, path, st, "audit-only"), ev.fd)
            self.counts["reported"] += 1
        except Exception:  # one bad event never stops the sensor
            self.counts["errors"] += 1
        finally:
            os.close(ev.fd)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._group >= 0:
            os.close(self._group)
            self._group = -1

    def stats(self) -> Dict[str, object]:
        out: Dict[str, object] = dict(self.counts)
        out["mask"] = self.name
        return out

