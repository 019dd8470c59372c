"""A small HTTP listener for Prometheus scrapes, loopback only unless told otherwise.

It lives on its own threads and never touches the exec path: each connection gets a thread,
at most ``MAX_CLIENTS`` at once (more are closed at once and counted), and each connection has
a deadline for reading the request and one for sending the answer. A client that connects
and never sends, or never reads, costs one of those threads until its deadline, nothing more.
The answer is rendered at most every ``RENDER_EVERY_S``; a scrape storm reuses it.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from agent.errors import ExecguardError

MAX_CLIENTS = 4
READ_DEADLINE_S = 5.0
SEND_DEADLINE_S = 5.0
ACCEPT_BACKOFF_S = 0.1
MAX_REQUEST = 8192
RENDER_EVERY_S = 0.5
PATHS = ("/metrics", "/")


class ListenError(ExecguardError):
    """A --metrics-listen value that is malformed or not allowed."""


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(spec: str, allow_remote: bool = False) -> ListenAddress:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) with a literal IP address; ``localhost`` means
    127.0.0.1. Anything but a loopback address needs ``allow_remote``."""
    host, sep, port_text = spec.rpartition(":")
    if not sep or not host:
        raise ListenError(f"--metrics-listen {spec!r}: expected HOST:PORT, "
                          "e.g. 127.0.0.1:9464")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        host = "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ListenError(f"--metrics-listen {spec!r}: {host!r} is not an IP address "
                          "(names are not resolved: give 127.0.0.1 or ::1)") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ListenError(f"--metrics-listen {spec!r}: port must be 0..65535")
    if not addr.is_loopback and not allow_remote:
        raise ListenError(f"--metrics-listen {spec!r}: {host} is not a loopback address; "
                          "metrics reveal the policy and backend, so listening beyond this "
                          "host needs --metrics-allow-remote")
    return ListenAddress(str(addr), int(port_text))


def _response(code: str, body: bytes, content_type: str, head_only: bool = False) -> bytes:
    header = (f"HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\n"
              f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii")
    return header if head_only else header + body


class MetricsListener:
    """Serves ``render()`` on ``address`` from daemon threads until ``close()``."""

    def __init__(self, address: ListenAddress, render: Callable[[], bytes],
                 content_type: str, max_clients: int = MAX_CLIENTS,
                 read_deadline_s: float = READ_DEADLINE_S,
                 send_deadline_s: float = SEND_DEADLINE_S) -> None:
        self.render_fn = render
        self.content_type = content_type
        self.max_clients = max_clients
        self.read_deadline_s = read_deadline_s
        self.send_deadline_s = send_deadline_s
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            self.sock.bind((address.host, address.port))
            self.sock.listen(16)
        except OSError:
            self.sock.close()
            raise
        self.address = ListenAddress(address.host, self.sock.getsockname()[1])
        self._lock = threading.Lock()
        self._render_lock = threading.Lock()
        self._cached: Tuple[float, bytes] = (float("-inf"), b"")
        self._active = 0
        self._closed = False
        self._n: Dict[str, int] = dict.fromkeys(
            ("scrapes", "rejected_busy", "bad_requests", "timeouts", "render_errors",
             "accept_errors"), 0)
        self._last_error: Optional[str] = None
        self._thread = threading.Thread(target=self._accept, name="metrics-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            return dict(self._n, active=self._active, listen=str(self.address),
                        last_error=self._last_error)

    def _count(self, key: str) -> None:
        with self._lock:
            self._n[key] += 1

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError as exc:
                if self._closed or exc.errno in (errno.EBADF, errno.EINVAL):
                    return  # closed
                # EMFILE, ENFILE, ENOMEM: the scrape waits in the backlog; never a dead
                # listener (the agent outlives an fd shortage, docs/fanotify.md)
                self._count("accept_errors")
                time.sleep(ACCEPT_BACKOFF_S)
                continue
            with self._lock:
                busy = self._active >= self.max_clients
                if not busy:
                    self._active += 1
                else:
                    self._n["rejected_busy"] += 1
            if busy:
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="metrics-client",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._answer(conn)
        except socket.timeout:
            self._count("timeouts")
        except OSError:
            pass  # the client went away
        finally:
            with self._lock:
                self._active -= 1

    def _read_request(self, conn: socket.socket) -> Optional[bytes]:
        deadline = time.monotonic() + self.read_deadline_s
        data = b""
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("request not read within the deadline")
            conn.settimeout(left)
            chunk = conn.recv(4096)
            if not chunk:
                return None
            data += chunk
            if len(data) > MAX_REQUEST:
                return b""
        return data

    def _answer(self, conn: socket.socket) -> None:
        request = self._read_request(conn)
        if request is None:
            return
        parts = request.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._count("bad_requests")
            reply = _response("400 Bad Request", b"bad request\n", "text/plain")
        elif parts[0] not in (b"GET", b"HEAD"):
            self._count("bad_requests")
            reply = _response("405 Method Not Allowed", b"GET or HEAD only\n", "text/plain")
        elif parts[1].split(b"?", 1)[0].decode("latin-1") not in PATHS:
            reply = _response("404 Not Found", b"metrics are at /metrics\n", "text/plain")
        else:
            body = self.render()
            if body is None:
                reply = _response("500 Internal Server Error", b"metrics unavailable\n",
                                  "text/plain")
            else:
                self._count("scrapes")
                reply = _response("200 OK", body, self.content_type, parts[0] == b"HEAD")
        self._send(conn, reply)

    def _send(self, conn: socket.socket, data: bytes) -> None:
        """All of ``data`` within the send deadline (a per-call timeout alone would let a
        client that reads a byte now and then hold the thread forever)."""
        deadline = time.monotonic() + self.send_deadline_s
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("answer not taken within the deadline")
            conn.settimeout(left)
            view = view[conn.send(view):]

    def render(self) -> Optional[bytes]:
        """The exposition, at most ``RENDER_EVERY_S`` old; None if rendering failed."""
        with self._render_lock:
            made, body = self._cached
            if time.monotonic() - made < RENDER_EVERY_S:
                return body
            try:
                body = self.render_fn()
            except Exception as exc:  # a metrics bug must not kill the listener
                with self._lock:
                    self._n["render_errors"] += 1
                    self._last_error = f"{type(exc).__name__}: {exc}"
                return None
            self._cached = (time.monotonic(), body)
            return body

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
