"""The systemd notification protocol (sd_notify(3)) over $NOTIFY_SOCKET, without libsystemd.

systemd passes a datagram socket address in ``NOTIFY_SOCKET``: a filesystem path, or an
abstract name written ``@name``. Each message is newline-separated ``KEY=value`` lines
(``READY=1``, ``STATUS=...``, ``STOPPING=1``, ``WATCHDOG=1``). Sending never blocks and
never raises: the socket is non-blocking, so a manager that does not read costs a dropped
message (counted), never a held-up exec decision.

``WATCHDOG_USEC`` is the watchdog interval systemd expects pings within; it applies to us
only when ``WATCHDOG_PID`` is unset or our pid. The variables are removed from the
environment once read, so the agent's children (the fanotify watchdog, mount, canaries)
never speak for it.
"""

from __future__ import annotations

import os
import socket
from typing import MutableMapping, Optional, Tuple

ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
MAX_STATUS = 1024  # one line in `systemctl status`; longer texts are cut


class NotifyConfigError(ValueError):
    """NOTIFY_SOCKET or WATCHDOG_USEC is set but unusable."""


def parse_address(value: str) -> str:
    """The socket address to send to: a path, or ``\\0name`` for ``@name``."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise NotifyConfigError(f"NOTIFY_SOCKET={value!r}: neither an absolute path nor an "
                            "abstract '@name' (vsock addresses are not supported)")


def parse_watchdog(usec: Optional[str], pid: Optional[str], own_pid: int) -> Optional[float]:
    """The watchdog interval in seconds, or None when no watchdog applies to ``own_pid``."""
    if usec is None or usec == "":
        return None
    if pid not in (None, "") and pid != str(own_pid):
        return None  # meant for another process (e.g. the shell that exec'd us)
    try:
        value = int(usec)
    except ValueError:
        raise NotifyConfigError(f"WATCHDOG_USEC={usec!r}: not an integer") from None
    if value <= 0:
        raise NotifyConfigError(f"WATCHDOG_USEC={usec!r}: must be positive")
    return value / 1e6


def status_text(text: str) -> str:
    """One line for STATUS=: newlines would start a new field."""
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_STATUS else flat[:MAX_STATUS - 3] + "..."


class Notifier:
    """Sends notifications to one manager socket; thread-safe (one datagram per call)."""

    def __init__(self, address: str, watchdog_s: Optional[float] = None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s
        self.sent = 0
        self.failed = 0
        self.last_error: Optional[str] = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                   | socket.SOCK_NONBLOCK)

    @classmethod
    def from_environ(cls, environ: Optional[MutableMapping[str, str]] = None,
                     unset: bool = True) -> Tuple[Optional[Notifier], Optional[str]]:
        """(notifier, problem): (None, None) when not started by a notify-aware manager,
        (None, why) when NOTIFY_SOCKET is set but unusable."""
        env = os.environ if environ is None else environ
        values = {k: env.get(k) for k in ENV_VARS}
        if unset:
            for k in ENV_VARS:
                env.pop(k, None)
        raw = values["NOTIFY_SOCKET"]
        if not raw:
            return None, None
        try:
            address = parse_address(raw)
            watchdog = parse_watchdog(values["WATCHDOG_USEC"], values["WATCHDOG_PID"],
                                      os.getpid())
        except NotifyConfigError as exc:
            return None, str(exc)
        return cls(address, watchdog), None

    def send(self, **fields: str) -> bool:
        """One message of ``KEY=value`` lines (keys upper-cased). False when it was not sent."""
        message = "".join(f"{k.upper()}={v}\n" for k, v in fields.items())
        try:
            self._sock.sendto(message.encode("utf-8", "replace"), socket.MSG_DONTWAIT,
                              self.address)
        except OSError as exc:  # EAGAIN (manager not reading), ECONNREFUSED, ENOENT, closed
            self.failed += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.send(ready="1", status=status_text(status))

    def status(self, status: str) -> bool:
        return self.send(status=status_text(status))

    def stopping(self, status: str) -> bool:
        return self.send(stopping="1", status=status_text(status))

    def watchdog(self) -> bool:
        return self.send(watchdog="1")

    def close(self) -> None:
        self._sock.close()
