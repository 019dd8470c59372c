"""The control socket answers root (and the agent's own uid) only, and never hangs a client."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

import pytest

from agent.control import ControlError, ControlServer, request


def handler(req: Dict[str, Any]) -> Dict[str, Any]:
    return {"state": "ready", "echo": req.get("cmd")}


def test_status_round_trip_and_socket_mode(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "control.sock")
    server = ControlServer(path, handler)
    server.start()
    try:
        assert request(path) == {"state": "ready", "echo": "status"}
        assert os.stat(path).st_mode & 0o777 == 0o600
    finally:
        server.close()
    assert not os.path.exists(path)


def test_no_agent_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="does not exist"):
        request(str(tmp_path / "none.sock"))


def test_stale_socket_is_replaced_but_a_regular_file_is_not(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    with pytest.raises(ControlError, match="no agent is listening"):
        request(str(stale))
    server = ControlServer(str(stale), handler)
    server.close()
    plain = tmp_path / "plain"
    plain.write_text("keep me")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(str(plain), handler)
    assert plain.read_text() == "keep me"


def test_bad_request_gets_an_error_object(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    server = ControlServer(path, lambda r: {"ok": True})
    server.start()
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(3)
        s.connect(path)
        s.sendall(b"[1, 2]\n")
        assert b"bad request" in s.recv(4096)
        s.close()
    finally:
        server.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_other_uids_are_refused() -> None:
    tmp = tempfile.mkdtemp(prefix="eg-control-")  # pytest's tmp root is 0700: unreachable
    os.chmod(tmp, 0o755)
    path = os.path.join(tmp, "c.sock")
    server = ControlServer(path, handler)
    server.start()
    try:
        os.chmod(path, 0o666)  # let the socket be reached: the peer-uid check must refuse
        code = ("import sys; from agent.control import request; "
                f"print(request({path!r}))")
        out = subprocess.run([sys.executable, "-c", code], user=65534, capture_output=True,
                             text=True, timeout=20, cwd=str(Path(__file__).parents[2]))
        assert "permission denied" in out.stdout, out.stderr
    finally:
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)


class _OutOfFds:
    """The listening socket as it behaves while the agent has no fd to spare: accept()
    fails with EMFILE a few times, then works again."""

    def __init__(self, sock: socket.socket, failures: int) -> None:
        self._sock, self.failures = sock, failures

    def accept(self) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise OSError(24, "Too many open files")
        return self._sock.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_an_fd_shortage_never_ends_the_server(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    server = ControlServer(path, handler)
    server.sock = _OutOfFds(server.sock, 3)  # type: ignore[assignment]
    server.start()
    try:
        assert request(path, timeout=5) == {"state": "ready", "echo": "status"}
        assert server.accept_errors == 3
    finally:
        server.close()


def test_clients_find_the_agent_with_the_same_flags_it_was_started_with(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import control

    default = tmp_path / "run" / "control.sock"
    old_state = tmp_path / "var-lib-execguard"
    monkeypatch.setattr(control, "DEFAULT_SOCKET", str(default))
    monkeypatch.setattr(control, "OLD_DEFAULT_STATE_DIR", str(old_state))
    assert control.client_socket("/x.sock", "/ignored") == "/x.sock"
    assert control.client_socket(None, None) == str(default)
    assert control.client_socket(None, "/srv/eg") == "/srv/eg/control.sock"
    # the old shipped EXECGUARD_STOP_OPTS named the old default state directory: an agent
    # on the new default socket is found there, and only there and only then
    old_state.mkdir()
    default.parent.mkdir()
    assert control.client_socket(None, str(old_state)) == str(old_state / "control.sock")
    default.touch()
    assert control.client_socket(None, str(old_state)) == str(default)
    (old_state / "control.sock").touch()  # an agent really started with that state dir
    assert control.client_socket(None, str(old_state)) == str(old_state / "control.sock")


def test_a_second_agent_never_takes_or_removes_a_live_agents_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    first = ControlServer(path, lambda req: {"state": "first"})
    first.start()
    try:
        with pytest.raises(ControlError, match="another agent answers on this socket"):
            ControlServer(path, lambda req: {"state": "second"})
        assert request(path)["state"] == "first"
        # a later socket at the path (the first one's was replaced) is not the first's to
        # remove when it closes
        os.unlink(path)
        second = ControlServer(path, lambda req: {"state": "second"})
        second.start()
        first.close()
        assert request(path)["state"] == "second"
        second.close()
        assert not os.path.exists(path)
    finally:
        first.close()
