"""The agent's control socket: a root-only Unix socket that answers ``status`` as JSON.

One request line in, one JSON line out. The peer's credentials (SO_PEERCRED) are checked
before anything is read: only uid 0 (or the agent's own uid) may ask. A handler that must
act only once its answer is on the way (``stop``: reply first, then exit) hands that action
to ``after_reply``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import struct
import threading
from typing import Any, Callable, Dict, List, Optional

DEFAULT_SOCKET = "/run/execguard/control.sock"
MAX_REQUEST = 4096
ACCEPT_BACKOFF_S = 0.1

Handler = Callable[[Dict[str, Any]], Dict[str, Any]]


class ControlError(Exception):
    """No agent answered, or it answered something unreadable."""


_request = threading.local()  # .after: the actions of the request this thread answers


def after_reply(action: Callable[[], None]) -> None:
    """Run ``action`` once the answer to the request being handled on this thread has been
    sent (or could not be: the client left) and its connection closed. Outside a
    control-socket request (a direct ``Agent.handle`` call) it runs at once."""
    pending: Optional[List[Callable[[], None]]] = getattr(_request, "after", None)
    if pending is None:
        action()
    else:
        pending.append(action)


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    """Serves requests on ``path`` from a daemon thread until ``close()``."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ControlError(f"{path}: exists and is not a socket; refusing to replace it")
            if _answers(path):  # another agent lives there: never take its socket away
                raise ControlError(f"{path}: another agent answers on this socket; stop it, or "
                                   "give this one its own --socket or --state-dir")
            os.unlink(path)  # a stale socket from an agent that died
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(8)
        bound = os.lstat(path)
        self._bound = (bound.st_dev, bound.st_ino)
        self._stop = threading.Event()
        self.accept_errors = 0
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError as exc:
                if self._stop.is_set() or exc.errno in (errno.EBADF, errno.EINVAL):
                    return  # closed
                # EMFILE, ENFILE, ENOMEM: the connection waits in the backlog; the server
                # lives on, so status answers again once the agent has fds to spare
                self.accept_errors += 1
                self._stop.wait(ACCEPT_BACKOFF_S)
                continue
            _request.after = []
            try:
                # a slow or broken client never stops the server
                with conn, contextlib.suppress(OSError, ValueError):
                    conn.settimeout(2.0)
                    self._answer(conn)
            finally:
                actions, _request.after = _request.after, None
                for action in actions:  # the server lives on; an action reports its failures
                    with contextlib.suppress(Exception):
                        action()

    def _answer(self, conn: socket.socket) -> None:
        uid = peer_uid(conn)
        if uid not in (0, os.geteuid()):
            conn.sendall(b'{"error": "permission denied: root only"}\n')
            return
        data = b""
        while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
            chunk = conn.recv(MAX_REQUEST)
            if not chunk:
                break
            data += chunk
        try:
            request = json.loads(data or b"{}")
            if not isinstance(request, dict):
                raise ValueError("request is not a JSON object")
        except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested JSON
            reply = {"error": f"bad request: {exc}"}
        else:
            try:
                reply = self.handler(request)
            except ValueError as exc:
                reply = {"error": f"bad request: {exc}"}
            except Exception as exc:  # a handler's bug must not end the control thread
                reply = {"error": f"internal error: {type(exc).__name__}: {exc}"}
        conn.sendall(json.dumps(reply, default=str).encode() + b"\n")

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        try:  # only our own socket: the path may name another agent's by now
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._bound:
                os.unlink(self.path)
        except OSError:
            pass


def _answers(path: str) -> bool:
    """Whether something accepts connections on ``path`` (a live agent, not a stale file)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def request(path: str, cmd: str = "status", timeout: float = 3.0,
            **args: Any) -> Dict[str, Any]:
    """Ask the agent at ``path``; raises ControlError when none answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        # a refusal may come before our request is read: still read the answer
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except FileNotFoundError:
        raise ControlError(f"no agent: {path} does not exist") from None
    except ConnectionRefusedError:
        raise ControlError(f"no agent is listening on {path}") from None
    except socket.timeout:
        raise ControlError(f"the agent on {path} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise ControlError(f"{path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"{path}: unreadable answer") from None
    if not isinstance(reply, dict):
        raise ControlError(f"{path}: answer is not a JSON object")
    return reply


def socket_path(state_dir: Optional[str]) -> str:
    """Where an agent started with ``--state-dir state_dir`` (or none) listens."""
    return os.path.join(state_dir, "control.sock") if state_dir else DEFAULT_SOCKET


# Before the socket moved to /run, the shipped /etc/default/execguard told `execguard stop`
# (the unit's ExecStop) --state-dir /var/lib/execguard. That file is a conffile an upgrade
# keeps: an agent there now listens on DEFAULT_SOCKET and must still be found.
OLD_DEFAULT_STATE_DIR = "/var/lib/execguard"


def client_socket(socket: Optional[str], state_dir: Optional[str]) -> str:
    """The socket a client verb asks: ``--socket``, else ``socket_path(--state-dir)``, with
    the one fallback above for the old default state directory."""
    if socket:
        return socket
    path = socket_path(state_dir)
    if (state_dir and os.path.realpath(state_dir) == OLD_DEFAULT_STATE_DIR
            and not os.path.exists(path) and os.path.exists(DEFAULT_SOCKET)):
        return DEFAULT_SOCKET
    return path
