"""Keepalive: the server pings every ping_interval and drops peers silent for ping_timeout."""

from __future__ import annotations

import struct
import time

import pytest
import warpsocket
from helpers import (
    LOGGING_ECHO_WORKER,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawConn,
    ask,
    connect,
    read_lines,
    wait_for,
)

FAST_PINGS = {"ping_interval": 0.5, "ping_timeout": 1.0}


def raw_sid(raw):
    raw.send_frame(OP_TEXT, "sid?")
    _, payload = raw.read_message()
    return int(payload)


PING_SETTINGS = [
    pytest.param({"ping_interval": 0.5, "ping_timeout": 1.0}, id="interval<timeout"),
    pytest.param({"ping_interval": 1.0, "ping_timeout": 1.0}, id="interval=timeout"),
    pytest.param({"ping_interval": 1.0, "ping_timeout": 0.5}, id="interval>timeout"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("settings", PING_SETTINGS)
def test_silent_peer_is_closed_1011_and_dropped(start_server, log_path, settings):
    server = start_server(LOGGING_ECHO_WORKER, threads=1, worker_arg=str(log_path), **settings)
    interval, timeout = settings["ping_interval"], settings["ping_timeout"]
    with RawConn(server.port, timeout=30) as raw, connect(server) as other:
        raw.handshake()
        sid = raw_sid(raw)
        t0 = time.monotonic()
        # from now on the raw client answers nothing; it only watches what arrives
        pings = 0
        close_code = None
        raw.sock.settimeout(10)
        while close_code is None:
            _fin, opcode, payload = raw.read_frame()
            if opcode == OP_PING:
                pings += 1
            elif opcode == OP_CLOSE:
                close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            assert time.monotonic() - t0 < 10, (
                f"still open after 10 s and {pings} unanswered pings "
                f"(ping_interval {interval}, ping_timeout {timeout})"
            )
        closed_after = time.monotonic() - t0
        assert pings >= 1, "the server closed the connection without pinging first"
        assert close_code == 1011
        # not before ping_timeout after the first ping, and within a few seconds
        assert interval + timeout - 0.2 <= closed_after < interval + timeout + 3, (
            f"closed after {closed_after:.1f}s"
        )
        # the peer does not answer the close either: the TCP connection is dropped
        assert raw.wait_eof(timeout=15), "the TCP connection of the silent peer was not dropped"
        dropped_after = time.monotonic() - t0
        assert dropped_after < 20
        wait_for(lambda: f"close {sid}" in read_lines(log_path), message="handle_close of the silent peer")
        assert read_lines(log_path).count(f"close {sid}") == 1
        assert warpsocket.send(sid, "anyone?") == 0
        # a well-behaved client on the same worker is unaffected
        assert ask(other, "still here") == "still here"


@pytest.mark.timeout(60)
def test_silent_peer_that_reads_nothing_is_dropped(start_server, log_path):
    """A peer that neither reads nor writes after the upgrade still gets dropped."""
    settings = {"ping_interval": 1.0, "ping_timeout": 1.0}
    server = start_server(LOGGING_ECHO_WORKER, threads=1, worker_arg=str(log_path), **settings)
    with RawConn(server.port, timeout=30) as raw:
        raw.handshake()
        sid = raw_sid(raw)
        t0 = time.monotonic()
        wait_for(lambda: f"close {sid}" in read_lines(log_path), timeout=10, message="handle_close")
        assert time.monotonic() - t0 < 10
        assert raw.wait_eof(timeout=15)
    wait_for(lambda: warpsocket.stats()["connections"] == 0, message="no connections left")


@pytest.mark.timeout(60)
def test_websockets_client_answering_pings_stays_connected(start_server, log_path):
    server = start_server(LOGGING_ECHO_WORKER, threads=1, worker_arg=str(log_path), **FAST_PINGS)
    # the client sends no pings of its own and no messages; it only answers the server's pings
    with connect(server, ping_interval=None) as ws:
        sid = int(ask(ws, "sid?"))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4.5:
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.5)
        assert ask(ws, "still connected") == "still connected"
        assert f"close {sid}" not in read_lines(log_path)
        assert warpsocket.send(sid, "push") == 1
        assert ws.recv(timeout=10) == "push"


@pytest.mark.timeout(60)
def test_server_pings_every_interval_and_pongs_keep_the_peer(start_server, log_path):
    server = start_server(LOGGING_ECHO_WORKER, threads=1, worker_arg=str(log_path), **FAST_PINGS)
    with RawConn(server.port, timeout=30) as raw:
        raw.handshake()
        sid = raw_sid(raw)
        t0 = time.monotonic()
        pings = 0
        raw.sock.settimeout(2.0)
        while time.monotonic() - t0 < 4.5:
            _fin, opcode, payload = raw.read_frame()
            assert opcode != OP_CLOSE, f"closed although every ping was answered: {payload!r}"
            if opcode == OP_PING:
                pings += 1
                raw.send_frame(OP_PONG, payload)
        # ping_interval 0.5 s over 4.5 s: about 9 pings
        assert pings >= 4, f"only {pings} pings in 4.5 s"
        raw.sock.settimeout(30)
        assert raw_sid(raw) == sid
    wait_for(lambda: f"close {sid}" in read_lines(log_path), message="handle_close")


@pytest.mark.timeout(60)
def test_client_pings_are_answered(start_server, log_path):
    server = start_server(LOGGING_ECHO_WORKER, threads=1, worker_arg=str(log_path))
    with RawConn(server.port, timeout=30) as raw:
        raw.handshake()
        raw.send_frame(OP_PING, b"are you there")
        while True:
            _fin, opcode, payload = raw.read_frame()
            if opcode == OP_PONG:
                assert payload == b"are you there"
                break


SLOW_ECHO_WORKER = """
import time
import warpsocket

def handle_text_message(text, socket_id):
    time.sleep(0.05)
    warpsocket.send(socket_id, text)
"""


@pytest.mark.timeout(120)
def test_peer_answering_pings_while_its_reader_is_paused_stays_connected(start_server):
    """A reader paused by flow control cannot hear pongs: that is not the peer's silence.

    150 messages at once to a handler taking 50 ms each: the reader pauses at 64
    outstanding events and stays paused for ~1.6 s at a time, three times the ping
    timeout, while the client answers every ping.
    """
    server = start_server(
        SLOW_ECHO_WORKER, threads=1, ping_interval=0.25, ping_timeout=0.5, hang_timeout=30.0
    )
    closed_1011_before = warpsocket.stats()["closes"].get(1011, 0)
    with connect(server, ping_interval=None) as ws:
        sent = [f"m{i}" for i in range(150)]
        for text in sent:
            ws.send(text)
        got = [ws.recv(timeout=60) for _ in sent]
        assert got == sent
        assert ask(ws, "still connected") == "still connected"
    assert warpsocket.stats()["closes"].get(1011, 0) == closed_1011_before
