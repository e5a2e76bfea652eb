"""RFC 6455 behaviour: echo, fragmentation, ping/pong, close handshake, limits, bad input."""

from __future__ import annotations

import contextlib

import pytest
import warpsocket
from helpers import (
    ECHO_WORKER,
    LOGGING_ECHO_WORKER,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawConn,
    ask,
    build_frame,
    close_payload,
    connect,
    expect_close,
    http_request_bytes,
    read_lines,
    upgrade_headers,
    wait_for,
)
from websockets.exceptions import ConnectionClosed


@pytest.fixture
def echo_server(start_server):
    return start_server(ECHO_WORKER, threads=2)


@pytest.fixture
def logging_server(start_server, log_path):
    return start_server(LOGGING_ECHO_WORKER, threads=2, worker_arg=str(log_path))


# ---------------------------------------------------------------- echo


def test_text_echo(echo_server):
    with connect(echo_server) as ws:
        for text in ["hello", "", "ünïcödé ✓ 🚀", "x" * 70000]:
            ws.send(text)
            reply = ws.recv(timeout=20)
            assert isinstance(reply, str)
            assert reply == text


def test_binary_echo(echo_server):
    with connect(echo_server) as ws:
        for data in [b"\x00\x01\x02\xff", b"", bytes(range(256)) * 300]:
            ws.send(data)
            reply = ws.recv(timeout=20)
            assert isinstance(reply, bytes)
            assert reply == data


def test_large_message_echo_default_limits(echo_server):
    payload = bytes(range(256)) * 4096 * 2  # 2 MiB
    with connect(echo_server) as ws:
        ws.send(payload)
        assert ws.recv(timeout=60) == payload


def test_fragmented_text_from_client(echo_server):
    with connect(echo_server) as ws:
        ws.send(["hel", "lo ", "wor", "ld"])
        reply = ws.recv(timeout=20)
        assert reply == "hello world"
        assert isinstance(reply, str)


def test_fragmented_binary_from_client(echo_server):
    with connect(echo_server) as ws:
        ws.send([b"\x01\x02", b"\x03", b"\x04\x05"])
        reply = ws.recv(timeout=20)
        assert reply == b"\x01\x02\x03\x04\x05"
        assert isinstance(reply, bytes)


def test_raw_fragmented_with_interleaved_ping(echo_server):
    with RawConn(echo_server.port) as raw:
        raw.handshake()
        raw.send_frame(OP_TEXT, "ab", fin=False)
        raw.send_frame(OP_PING, b"mid")
        raw.send_frame(OP_CONT, "cd", fin=False)
        raw.send_frame(OP_CONT, "ef", fin=True)
        frames = []
        while not any(op == OP_TEXT for _, op, _ in frames):
            frames.append(raw.read_frame())
        assert (True, OP_PONG, b"mid") in frames
        texts = [p for _, op, p in frames if op == OP_TEXT]
        assert texts == [b"abcdef"]


def test_raw_utf8_character_split_across_fragments_is_valid(echo_server):
    data = "é€😀".encode()
    with RawConn(echo_server.port) as raw:
        raw.handshake()
        raw.send_frame(OP_TEXT, data[:1], fin=False)
        raw.send_frame(OP_CONT, data[1:4], fin=False)
        raw.send_frame(OP_CONT, data[4:], fin=True)
        opcode, payload = raw.read_message()
        assert opcode == OP_TEXT
        assert payload == data


# ---------------------------------------------------------------- ping / pong


def test_client_ping_is_answered(echo_server):
    with connect(echo_server) as ws:
        pong = ws.ping(b"are you there")
        assert pong.wait(20), "no pong received"
        assert ask(ws, "still here") == "still here"


def test_raw_ping_gets_pong_with_same_payload(echo_server):
    with RawConn(echo_server.port) as raw:
        raw.handshake()
        raw.send_frame(OP_PING, b"payload-123")
        fin, opcode, payload = raw.read_frame()
        while opcode == OP_PING:  # tolerate a server keepalive ping
            fin, opcode, payload = raw.read_frame()
        assert (fin, opcode, payload) == (True, OP_PONG, b"payload-123")


def test_server_keepalive_drops_unresponsive_client(start_server):
    server = start_server(ECHO_WORKER, threads=1, ping_interval=1.0, ping_timeout=1.0)
    with RawConn(server.port, timeout=30) as raw:
        raw.handshake()
        # the server pings an idle connection...
        _fin, opcode, _ = raw.read_frame()
        assert opcode == OP_PING
        # ...and since we never answer, it gives up with 1011 (or drops TCP)
        code, _ = raw.read_close()
        assert code in (1011, None)
    wait_for(
        lambda: warpsocket.stats()["connections"] == 0,
        message="dropped connection to be gone",
    )


def test_server_keepalive_keeps_responsive_client(start_server):
    server = start_server(ECHO_WORKER, threads=1, ping_interval=0.5, ping_timeout=2.0)
    with connect(server) as ws:  # websockets answers pings automatically
        # stay idle for several ping intervals (recv keeps the client's pong machinery going)
        with pytest.raises(TimeoutError):
            ws.recv(timeout=3.0)
        assert ask(ws, "alive") == "alive"


# ---------------------------------------------------------------- close handshake


def test_client_initiated_close(logging_server, log_path):
    ws = connect(logging_server)
    sid = int(ask(ws, "sid?"))
    ws.close()
    assert ws.close_code == 1000, "server must answer the close handshake with a close frame"
    wait_for(lambda: f"close {sid}" in read_lines(log_path), message="handle_close to run")
    assert read_lines(log_path).count(f"close {sid}") == 1
    assert warpsocket.send(sid, "too late") == 0


def test_raw_client_close_gets_close_frame_and_tcp_close(logging_server, log_path):
    with RawConn(logging_server.port) as raw:
        raw.handshake()
        raw.send_frame(OP_TEXT, "sid?")
        _, payload = raw.read_message()
        sid = int(payload)
        raw.send_frame(OP_CLOSE, close_payload(1000, "bye"))
        code, _ = raw.read_close()
        assert code == 1000
        assert raw.wait_eof(20), "server should close the TCP connection after the close handshake"
    wait_for(lambda: f"close {sid}" in read_lines(log_path), message="handle_close to run")


def test_client_close_with_custom_code_gets_close_frame(logging_server, log_path):
    ws = connect(logging_server)
    sid = int(ask(ws, "sid?"))
    ws.close(code=4321, reason="custom")
    assert ws.close_code is not None, "no close frame received from the server"
    wait_for(lambda: f"close {sid}" in read_lines(log_path), message="handle_close to run")


def test_abrupt_disconnect_runs_handle_close(logging_server, log_path):
    raw = RawConn(logging_server.port)
    raw.handshake()
    raw.send_frame(OP_TEXT, "sid?")
    _, payload = raw.read_message()
    sid = int(payload)
    raw.close()  # no close frame at all
    wait_for(
        lambda: f"close {sid}" in read_lines(log_path),
        message="handle_close after TCP drop",
    )
    wait_for(lambda: warpsocket.stats()["connections"] == 0, message="connection to be gone")
    assert read_lines(log_path).count(f"close {sid}") == 1


# ---------------------------------------------------------------- limits


def test_max_message_size_exact_limit_is_accepted(start_server):
    server = start_server(ECHO_WORKER, threads=1, max_message_size=1024)
    with connect(server) as ws:
        ws.send(b"a" * 1024)
        assert ws.recv(timeout=20) == b"a" * 1024
        ws.send("b" * 1024)
        assert ws.recv(timeout=20) == "b" * 1024


@pytest.mark.parametrize("kind", ["text", "binary", "fragmented"])
def test_max_message_size_exceeded_closes_1009(start_server, log_path, kind):
    server = start_server(LOGGING_ECHO_WORKER, threads=1, max_message_size=1024, worker_arg=str(log_path))
    other = connect(server)
    try:
        with connect(server) as ws:
            sid = int(ask(ws, "sid?"))
            if kind == "text":
                message = "t" * 1025
            elif kind == "binary":
                message = b"b" * 4096
            else:
                message = [b"f" * 600, b"f" * 600]
            # the server may close while the (fragmented) message is still being sent
            with contextlib.suppress(ConnectionClosed):
                ws.send(message)
            code, _ = expect_close(ws)
            assert code == 1009
        wait_for(
            lambda: f"close {sid}" in read_lines(log_path),
            message="handle_close after 1009",
        )
        assert ask(other, "unaffected") == "unaffected"
    finally:
        other.close()


# ---------------------------------------------------------------- protocol errors (raw frames)


def test_invalid_utf8_text_closes_1007(logging_server, log_path):
    with RawConn(logging_server.port) as raw:
        raw.handshake()
        raw.send_frame(OP_TEXT, b"ok \xff\xfe bad")
        code, _ = raw.read_close()
        assert code == 1007


def test_invalid_utf8_across_fragments_closes_1007(echo_server):
    with RawConn(echo_server.port) as raw:
        raw.handshake()
        raw.send_frame(OP_TEXT, b"abc\xc3", fin=False)
        raw.send_frame(OP_CONT, b"\x28", fin=True)  # 0xC3 0x28 is not valid UTF-8
        code, _ = raw.read_close()
        assert code == 1007


PROTOCOL_ERRORS = {
    "unmasked": [{"opcode": OP_TEXT, "payload": b"hello", "mask": False}],
    "reserved_bits": [{"opcode": OP_TEXT, "payload": b"hello", "rsv": 0b100}],
    "reserved_data_opcode": [{"opcode": 0x3, "payload": b"hello"}],
    "reserved_control_opcode": [{"opcode": 0xB, "payload": b""}],
    "continuation_without_start": [{"opcode": OP_CONT, "payload": b"hello"}],
    "new_message_inside_fragmented": [
        {"opcode": OP_TEXT, "payload": b"part", "fin": False},
        {"opcode": OP_TEXT, "payload": b"other"},
    ],
    "fragmented_ping": [{"opcode": OP_PING, "payload": b"p", "fin": False}],
    "oversized_ping": [{"opcode": OP_PING, "payload": b"p" * 126}],
}


@pytest.mark.parametrize("case", sorted(PROTOCOL_ERRORS))
def test_protocol_error_closes_1002(logging_server, log_path, case):
    with RawConn(logging_server.port) as raw:
        raw.handshake()
        raw.send_frame(OP_TEXT, "sid?")
        _, payload = raw.read_message()
        sid = int(payload)
        data = b"".join(
            build_frame(
                f["opcode"],
                f["payload"],
                fin=f.get("fin", True),
                mask=f.get("mask", True),
                rsv=f.get("rsv", 0),
            )
            for f in PROTOCOL_ERRORS[case]
        )
        raw.sendall(data)
        code, _ = raw.read_close()
        assert code == 1002
    wait_for(
        lambda: f"close {sid}" in read_lines(log_path),
        message="handle_close after 1002",
    )


# ---------------------------------------------------------------- HTTP level


def test_plain_http_get_gets_426(logging_server, log_path):
    with RawConn(logging_server.port) as raw:
        raw.sendall(http_request_bytes("/", {"Accept": "text/html"}, logging_server.port))
        status, _headers, _ = raw.read_http_response()
        assert status == 426
    assert read_lines(log_path) == []


@pytest.mark.parametrize(
    "case",
    ["missing_key", "missing_connection_upgrade", "not_http", "bad_request_line"],
)
def test_malformed_handshake_gets_400(logging_server, log_path, case):
    port = logging_server.port
    if case == "missing_key":
        request = http_request_bytes("/", upgrade_headers(**{"Sec-WebSocket-Key": None}), port)
    elif case == "missing_connection_upgrade":
        request = http_request_bytes("/", upgrade_headers(Connection=None), port)
    elif case == "not_http":
        request = b"this is definitely not an http request\r\n\r\n"
    else:
        request = b"GET\r\nHost: x\r\n\r\n"
    with RawConn(port) as raw:
        raw.sendall(request)
        status, _headers, _ = raw.read_http_response()
        assert status == 400
    # a malformed handshake never reaches a handler
    assert read_lines(log_path) == []
    with connect(logging_server) as ws:
        assert ask(ws, "fine") == "fine"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Sec-WebSocket-Version": None}, id="missing-version"),
        pytest.param({"Sec-WebSocket-Key": "c2hvcnQ="}, id="key-of-5-bytes"),
        pytest.param({"Sec-WebSocket-Key": "AAAAAAAAAAAAAAAAAAAAAAA="}, id="key-of-17-bytes"),
        pytest.param({"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ"}, id="key-unpadded"),
        pytest.param({"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub2*jZQ=="}, id="key-not-base64"),
        pytest.param({"Sec-WebSocket-Key": "0123456789abcdef"}, id="key-raw-16-chars"),
    ],
)
def test_bad_key_or_missing_version_gets_400(logging_server, log_path, headers):
    """RFC 6455 §4.2.1: the key is base64 of 16 bytes and the version is required.

    See docs/api.md#handshake-errors.
    """
    with RawConn(logging_server.port) as raw:
        raw.sendall(http_request_bytes("/", upgrade_headers(**headers), logging_server.port))
        status, response_headers, _ = raw.read_http_response()
        assert status == 400
        assert "sec-websocket-version" not in response_headers
    assert read_lines(log_path) == []
    with connect(logging_server) as ws:
        assert ask(ws, "fine") == "fine"


def test_wrong_websocket_version_gets_426_with_version_header(logging_server, log_path):
    with RawConn(logging_server.port) as raw:
        raw.sendall(
            http_request_bytes(
                "/",
                upgrade_headers(**{"Sec-WebSocket-Version": "8"}),
                logging_server.port,
            )
        )
        status, headers, _ = raw.read_http_response()
        assert status == 426
        assert headers.get("sec-websocket-version") == "13"
    assert read_lines(log_path) == []


def test_raw_handshake_accept_header(echo_server):
    with RawConn(echo_server.port) as raw:
        headers = raw.handshake("/some/path?q=1")  # checks 101 + Sec-WebSocket-Accept
        assert headers.get("upgrade", "").lower() == "websocket"
        raw.send_frame(OP_BINARY, b"\x00raw")
        opcode, payload = raw.read_message()
        assert (opcode, payload) == (OP_BINARY, b"\x00raw")
