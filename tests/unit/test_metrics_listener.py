"""The metrics listener on real loopback sockets: address rules, HTTP answers, and clients
that stall (never send, never read) or flood it."""

from __future__ import annotations

import socket
import threading
import time
from typing import Iterator, List

import pytest

from agent.metrics.config import MetricsConfig, check_config
from agent.metrics.listener import ListenAddress, ListenError, MetricsListener, parse_listen

BODY = b"# TYPE execguard_up gauge\nexecguard_up 1.0\n"


def http_get(port: int, path: str = "/metrics", method: str = "GET",
             timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        chunks: List[bytes] = []
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


@pytest.fixture
def listener() -> Iterator[MetricsListener]:
    renders: List[float] = []

    def render() -> bytes:
        renders.append(time.monotonic())
        return BODY

    srv = MetricsListener(ListenAddress("127.0.0.1", 0), render, "text/plain; version=0.0.4",
                          max_clients=2, read_deadline_s=1.0)
    srv.start()
    try:
        yield srv
    finally:
        srv.close()


def test_parse_listen_accepts_loopback_and_refuses_the_rest() -> None:
    assert parse_listen("127.0.0.1:9464") == ListenAddress("127.0.0.1", 9464)
    assert parse_listen("localhost:9464") == ListenAddress("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ListenAddress("::1", 9464)
    assert str(parse_listen("[::1]:0")) == "[::1]:0"
    for remote in ("0.0.0.0:9464", "192.0.2.2:9464", "[::]:9464", "[fd00::2]:1"):
        with pytest.raises(ListenError, match=r"not a loopback address.*--metrics-allow-remote"):
            parse_listen(remote)
        assert parse_listen(remote, allow_remote=True).port in (9464, 1)
    for bad, why in (("9464", "HOST:PORT"), (":9464", "HOST:PORT"),
                     ("example.com:9464", "not an IP address"),
                     ("127.0.0.1:http", "port must be"), ("127.0.0.1:70000", "port must be")):
        with pytest.raises(ListenError, match=why):
            parse_listen(bad)
    with pytest.raises(ListenError, match="not a loopback"):
        check_config(MetricsConfig(listen="0.0.0.0:9464"))


def test_serves_metrics_and_answers_http_errors(listener: MetricsListener) -> None:
    port = listener.address.port
    ok = http_get(port)
    head, _, body = ok.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and body == BODY
    assert b"Content-Type: text/plain; version=0.0.4" in head
    assert http_get(port, "/").startswith(b"HTTP/1.1 200")
    assert http_get(port, "/metrics", "HEAD").endswith(b"\r\n\r\n")  # headers only
    assert http_get(port, "/other").startswith(b"HTTP/1.1 404")
    assert http_get(port, "/metrics", "POST").startswith(b"HTTP/1.1 405")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert listener.stats()["scrapes"] == 3


def test_bound_to_loopback_only(listener: MetricsListener) -> None:
    port = listener.address.port
    # 127.0.0.2 is loopback too, but not the address bound: refused like any other
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=5).close()


def test_stalled_clients_cost_a_slot_until_their_deadline(listener: MetricsListener) -> None:
    port = listener.address.port
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]  # never send
    try:
        time.sleep(0.2)
        # both slots taken: a third connection is closed at once, not queued behind them
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            started = time.monotonic()
            try:
                extra.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
                assert extra.recv(100) == b""
            except (ConnectionResetError, BrokenPipeError):
                pass  # closed with our request unread: a reset, just as final
            assert time.monotonic() - started < 0.5
        assert listener.stats()["rejected_busy"] >= 1
        # the stalled ones are dropped at their 1 s read deadline; then scrapes work again
        deadline = time.monotonic() + 5
        while listener.stats()["timeouts"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener.stats()["timeouts"] == 2
        assert http_get(port).startswith(b"HTTP/1.1 200")
        for s in stalled:
            assert s.recv(10) == b""  # closed by the listener
    finally:
        for s in stalled:
            s.close()


def test_scrape_storm_renders_at_most_twice_a_second() -> None:
    renders: List[float] = []

    def render() -> bytes:
        renders.append(time.monotonic())
        return BODY

    srv = MetricsListener(ListenAddress("127.0.0.1", 0), render, "text/plain")
    srv.start()
    try:
        threads = [threading.Thread(target=lambda: [http_get(srv.address.port)
                                                    for _ in range(10)]) for _ in range(3)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        took = time.monotonic() - started
        assert len(renders) <= took / 0.5 + 2, (len(renders), took)
    finally:
        srv.close()


def test_a_failing_render_is_a_500_and_the_listener_lives_on() -> None:
    calls = {"n": 0}

    def render() -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return BODY

    srv = MetricsListener(ListenAddress("127.0.0.1", 0), render, "text/plain")
    srv.start()
    try:
        assert http_get(srv.address.port).startswith(b"HTTP/1.1 500")
        assert srv.stats()["last_error"] == "RuntimeError: boom"
        assert http_get(srv.address.port).startswith(b"HTTP/1.1 200")
    finally:
        srv.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", srv.address.port), timeout=5).close()


def test_a_taken_port_is_an_oserror() -> None:
    first = MetricsListener(ListenAddress("127.0.0.1", 0), lambda: BODY, "text/plain")
    try:
        with pytest.raises(OSError):
            MetricsListener(ListenAddress("127.0.0.1", first.address.port), lambda: BODY,
                            "text/plain")
    finally:
        first.close()


def test_a_client_that_never_reads_is_cut_off_at_the_send_deadline() -> None:
    big = b"x" * (16 << 20) + b"END\n"  # far more than the socket buffers hold
    srv = MetricsListener(ListenAddress("127.0.0.1", 0), lambda: big, "text/plain",
                          max_clients=2, send_deadline_s=3.0)
    srv.start()
    try:
        hog = socket.socket()
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.connect(("127.0.0.1", srv.address.port))
        hog.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")  # and never reads
        time.sleep(0.3)
        assert srv.stats()["active"] == 1
        started = time.monotonic()
        other = http_get(srv.address.port, timeout=30)  # the other slot still serves
        assert other.endswith(b"\r\n\r\n" + big)
        deadline = time.monotonic() + 5
        while srv.stats()["timeouts"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.stats()["timeouts"] == 1 and srv.stats()["active"] == 0
        assert time.monotonic() - started < 5
        hog.close()
    finally:
        srv.close()


def test_ipv6_loopback() -> None:
    srv = MetricsListener(parse_listen("[::1]:0"), lambda: BODY, "text/plain")
    srv.start()
    try:
        with socket.create_connection(("::1", srv.address.port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(BODY)
        assert str(srv.address).startswith("[::1]:")
        with pytest.raises(ConnectionRefusedError):  # v6 only: not on 127.0.0.1
            socket.create_connection(("127.0.0.1", srv.address.port), timeout=5).close()
    finally:
        srv.close()
