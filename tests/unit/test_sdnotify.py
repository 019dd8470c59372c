"""agent/sdnotify.py against a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from agent.service.sdnotify import (
    MAX_STATUS,
    Notifier,
    NotifyConfigError,
    parse_address,
    parse_watchdog,
    status_text,
)


def fields(datagram: bytes) -> Dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


@pytest.fixture(name="listener")
def listener_fixture(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(2)
    try:
        yield sock
    finally:
        sock.close()


def test_path_socket_gets_ready_status_watchdog_stopping(listener: socket.socket) -> None:
    env = {"NOTIFY_SOCKET": listener.getsockname(), "WATCHDOG_USEC": "20000000"}
    notifier, problem = Notifier.from_environ(env)
    assert problem is None and notifier is not None
    assert notifier.watchdog_s == 20.0
    assert notifier.ready("ready: backend fanotify-exec")
    assert notifier.watchdog()
    assert notifier.status("multi\nline   status")
    assert notifier.stopping("stopping: stopped by signal")
    got: List[Dict[str, str]] = [fields(listener.recv(4096)) for _ in range(4)]
    assert got[0] == {"READY": "1", "STATUS": "ready: backend fanotify-exec"}
    assert got[1] == {"WATCHDOG": "1"}
    assert got[2] == {"STATUS": "multi line status"}  # a newline would start a new field
    assert got[3] == {"STOPPING": "1", "STATUS": "stopping: stopped by signal"}
    assert notifier.sent == 4 and notifier.failed == 0
    notifier.close()


def test_abstract_socket() -> None:
    name = f"execguard-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        notifier, problem = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert problem is None and notifier is not None and notifier.watchdog_s is None
        assert notifier.ready("ready")
        assert fields(sock.recv(4096)) == {"READY": "1", "STATUS": "ready"}
        notifier.close()
    finally:
        sock.close()


def test_environment_is_removed_so_children_never_notify(listener: socket.socket) -> None:
    env = {"NOTIFY_SOCKET": listener.getsockname(), "WATCHDOG_USEC": "1000000",
           "WATCHDOG_PID": str(os.getpid()), "OTHER": "kept"}
    notifier, _ = Notifier.from_environ(env)
    assert notifier is not None and notifier.watchdog_s == 1.0
    assert env == {"OTHER": "kept"}
    kept = {"NOTIFY_SOCKET": listener.getsockname()}
    Notifier.from_environ(kept, unset=False)
    assert "NOTIFY_SOCKET" in kept


def test_not_under_a_manager() -> None:
    assert Notifier.from_environ({}) == (None, None)
    assert Notifier.from_environ({"NOTIFY_SOCKET": ""}) == (None, None)


def test_bad_addresses_and_intervals_are_reported_not_raised() -> None:
    notifier, problem = Notifier.from_environ({"NOTIFY_SOCKET": "relative/path"})
    assert notifier is None and problem is not None and "NOTIFY_SOCKET" in problem
    notifier, problem = Notifier.from_environ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "soon"})
    assert notifier is None and problem is not None and "WATCHDOG_USEC" in problem
    with pytest.raises(NotifyConfigError):
        parse_address("vsock:2:1234")
    with pytest.raises(NotifyConfigError):
        parse_address("@")
    with pytest.raises(NotifyConfigError):
        parse_watchdog("0", None, 1)
    assert parse_address("@name") == "\0name"


def test_watchdog_meant_for_another_pid_is_ignored() -> None:
    assert parse_watchdog("5000000", str(os.getpid() + 1), os.getpid()) is None
    assert parse_watchdog("5000000", str(os.getpid()), os.getpid()) == 5.0
    assert parse_watchdog("5000000", None, os.getpid()) == 5.0
    assert parse_watchdog(None, None, os.getpid()) is None


def test_no_listener_is_a_counted_failure_not_an_exception(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody"))
    assert not notifier.watchdog()
    assert notifier.failed == 1 and notifier.last_error is not None
    notifier.close()
    assert not notifier.status("after close")  # closed: still no exception


def test_a_manager_that_does_not_read_never_blocks_the_sender(listener: socket.socket) -> None:
    notifier = Notifier(listener.getsockname())
    started = time.monotonic()
    for _ in range(5000):  # far more than a datagram socket's queue holds
        notifier.status("x" * 512)
    assert time.monotonic() - started < 5
    assert notifier.failed > 0 and "BlockingIOError" in str(notifier.last_error)
    notifier.close()


def test_status_is_one_bounded_line() -> None:
    assert status_text("a\nb\tc") == "a b c"
    long = status_text("y" * (MAX_STATUS * 2))
    assert len(long) == MAX_STATUS and long.endswith("...")
