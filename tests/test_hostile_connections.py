"""Hostile or broken clients before the upgrade: timeouts, oversized and malformed requests.

None of them may reach a handler or slow down well-behaved clients.
"""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest
from helpers import (
    LOGGING_PRELUDE,
    RawConn,
    ask,
    connect,
    http_request_bytes,
    read_lines,
    upgrade_headers,
    wait_for,
)

HANDSHAKE_TIMEOUT = 10.0  # fixed by the implementation
HANDSHAKE_TIMEOUT_MAX = 16.0  # what the tests accept

WATCH_WORKER = (
    LOGGING_PRELUDE
    + """
def handle_open(socket_id, ip, headers):
    log("open", socket_id, headers.get(":path", "?"))
    return True

def handle_text_message(text, socket_id):
    warpsocket.send(socket_id, text)

def handle_close(socket_id):
    log("close", socket_id)
"""
)


def opened_paths(log_path):
    return [line.split()[2] for line in read_lines(log_path) if line.startswith("open ")]


def server_ended(sock, timeout):
    """Wait until the server closes ``sock`` (EOF or reset); return the time it took or None."""
    t0 = time.monotonic()
    sock.settimeout(0.5)
    while time.monotonic() - t0 < timeout:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t0
        if not chunk:
            return time.monotonic() - t0
    return None


class Slowloris(threading.Thread):
    """Trickles one header byte at a time, forever, until the server hangs up."""

    def __init__(self, port, interval=0.3):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.interval = interval
        self.started = time.monotonic()
        self.ended_after = None
        self.sent = 0
        self.received = b""
        self._halt = threading.Event()

    def run(self):
        request = b"GET /slowloris HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nX-Slow: "
        try:
            self.sock.sendall(request)
            while not self._halt.is_set():
                readable, _, _ = select.select([self.sock], [], [], self.interval)
                if readable:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        break
                    self.received += chunk
                    continue
                self.sock.sendall(b"a")
                self.sent += 1
        except OSError:
            pass
        self.ended_after = time.monotonic() - self.started

    def stop(self):
        self._halt.set()
        self.join(timeout=5)
        self.sock.close()


@pytest.mark.timeout(90)
def test_slowloris_and_silent_connections_are_dropped_after_handshake_timeout(start_server, log_path):
    server = start_server(WATCH_WORKER, threads=2, worker_arg=str(log_path))
    loris = Slowloris(server.port)
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    silent_t0 = time.monotonic()
    silent_ended = {}

    def watch_silent():
        silent_ended["after"] = server_ended(silent, HANDSHAKE_TIMEOUT_MAX + 5)

    watcher = threading.Thread(target=watch_silent, daemon=True)
    try:
        loris.start()
        watcher.start()
        # meanwhile a normal client connects and talks, again and again
        rounds = 0
        while watcher.is_alive() or loris.is_alive():
            with connect(server, path="/normal") as ws:
                t0 = time.monotonic()
                assert ask(ws, f"hello {rounds}") == f"hello {rounds}"
                assert time.monotonic() - t0 < 3
            rounds += 1
            time.sleep(0.2)
            if time.monotonic() - silent_t0 > HANDSHAKE_TIMEOUT_MAX + 5:
                break
        watcher.join(timeout=10)
        loris.join(timeout=10)
        assert rounds >= 5
        silent_after = silent_ended.get("after")
        assert silent_after is not None, "a connection that never sent a byte was not dropped"
        assert HANDSHAKE_TIMEOUT - 1 <= silent_after <= HANDSHAKE_TIMEOUT_MAX, silent_after
        assert loris.ended_after is not None and not loris.is_alive(), (
            "the slowloris connection is still open"
        )
        assert loris.ended_after <= HANDSHAKE_TIMEOUT_MAX, f"slowloris dropped after {loris.ended_after:.1f}s"
        assert loris.sent >= 10, "the slowloris client did not get to trickle"
        assert not loris.received.startswith(b"HTTP/1.1 101"), loris.received
        # neither reached handle_open
        paths = opened_paths(log_path)
        assert set(paths) == {"/normal"}, paths
        assert len(paths) == rounds
    finally:
        loris.stop()
        silent.close()


@pytest.mark.timeout(90)
def test_many_idle_tcp_connections_do_not_stall_others(start_server, log_path):
    server = start_server(WATCH_WORKER, threads=2, worker_arg=str(log_path))
    idle = []
    try:
        for _ in range(200):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
        t0 = time.monotonic()
        for i in range(5):
            with connect(server, path="/normal") as ws:
                assert ask(ws, f"hi {i}") == f"hi {i}"
        assert time.monotonic() - t0 < 5, "normal clients were slowed by idle connections"
        # every idle connection is dropped after the handshake timeout
        t1 = time.monotonic()
        for s in idle:
            remaining = max(HANDSHAKE_TIMEOUT_MAX + 5 - (time.monotonic() - t1), 0.5)
            assert server_ended(s, remaining) is not None, "an idle connection was not dropped"
        assert opened_paths(log_path) == ["/normal"] * 5
        with connect(server, path="/normal") as ws:
            assert ask(ws, "after") == "after"
    finally:
        for s in idle:
            s.close()


@pytest.mark.timeout(60)
def test_pending_upgrade_limit_makes_room_for_newcomers(start_server, log_path):
    server = start_server(WATCH_WORKER, threads=2, worker_arg=str(log_path), max_pending_upgrades=20)
    idle = []
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(20)]
        # A prompt client over the limit is served at once, in the place of the connection
        # that has waited longest (all come from one address here).
        with connect(server, path="/extra") as ws:
            assert ask(ws, "ok") == "ok"
        took = server_ended(idle[0], 5.0)
        assert took is not None and took < 5.0, "the longest-waiting connection was not dropped"
        assert server_ended(idle[1], 0.5) is None, "a younger handshake was dropped"
    finally:
        for s in idle:
            s.close()
    assert opened_paths(log_path) == ["/extra"]


def http_status(port, request, timeout=20):
    with RawConn(port, timeout=timeout) as raw:
        raw.sendall(request)
        status, _headers, _body = raw.read_http_response()
        return status


def test_header_block_over_16k_gets_431(start_server, log_path):
    server = start_server(WATCH_WORKER, threads=1, worker_arg=str(log_path))
    headers = upgrade_headers(X_Big="a" * (20 * 1024))
    assert http_status(server.port, http_request_bytes("/big", headers, server.port)) == 431
    many_small = upgrade_headers(**{f"X-Part-{i}": "b" * 300 for i in range(60)})  # ~18 KiB in 60 lines
    assert http_status(server.port, http_request_bytes("/big2", many_small, server.port)) == 431
    with connect(server, path="/normal") as ws:
        assert ask(ws, "fine") == "fine"
    assert opened_paths(log_path) == ["/normal"]


def test_header_block_just_under_the_limits_is_accepted(start_server, log_path):
    server = start_server(WATCH_WORKER, threads=1, worker_arg=str(log_path))
    headers = upgrade_headers(X_Big="a" * (12 * 1024))
    for i in range(40):
        headers[f"X-Line-{i}"] = "v"
    with RawConn(server.port) as raw:
        raw.sendall(http_request_bytes("/nearly", headers, server.port))
        status, _, _ = raw.read_http_response()
        assert status == 101
    wait_for(lambda: opened_paths(log_path) == ["/nearly"], message="handle_open")


def test_too_many_header_lines_get_431(start_server, log_path):
    server = start_server(WATCH_WORKER, threads=1, worker_arg=str(log_path))
    headers = upgrade_headers(**{f"X-Line-{i}": "v" for i in range(100)})
    request = http_request_bytes("/lines", headers, server.port)
    assert len(request) < 16 * 1024
    assert http_status(server.port, request) == 431
    with connect(server, path="/normal") as ws:
        assert ask(ws, "fine") == "fine"
    assert opened_paths(log_path) == ["/normal"]


@pytest.mark.timeout(60)
def test_endless_header_line_is_refused(start_server, log_path):
    server = start_server(WATCH_WORKER, threads=1, worker_arg=str(log_path))
    with RawConn(server.port, timeout=20) as raw:
        raw.sendall(b"GET /endless HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
        chunk = b"a" * 4096
        sent = 0
        answered = False
        # keep sending the same header line until the server answers (at most 4 MiB)
        while sent < 4 * 1024 * 1024:
            readable, _, _ = select.select([raw.sock], [], [], 0.02)
            if readable:
                answered = True
                break
            try:
                raw.sendall(chunk)
            except OSError:
                answered = True  # the server stopped reading / hung up: look at what it said
                break
            sent += len(chunk)
        assert answered, f"the server kept reading a {sent} byte header line"
        assert sent <= 1024 * 1024, f"the server read {sent} bytes of one header line before refusing"
        try:
            status, _, _ = raw.read_http_response()
        except (EOFError, ConnectionResetError) as exc:
            raise AssertionError(f"dropped without an HTTP status: {exc!r}") from None
        assert status in (431, 400)
    with connect(server, path="/normal") as ws:
        assert ask(ws, "fine") == "fine"
    assert opened_paths(log_path) == ["/normal"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"GARBAGE\r\n\r\n", id="not-http"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n", id="no-key"),
        pytest.param(b"GET / HTTP/1.1\r\nHost x\r\nno colon here\r\n\r\n", id="bad-header-line"),
    ],
)
def test_malformed_requests_get_400(start_server, log_path, request_bytes):
    server = start_server(WATCH_WORKER, threads=1, worker_arg=str(log_path))
    assert http_status(server.port, request_bytes) == 400
    with connect(server, path="/normal") as ws:
        assert ask(ws, "fine") == "fine"
    assert opened_paths(log_path) == ["/normal"]
