"""permessage-deflate (docs/api.md#compression) through the public API, with real clients.

``websockets`` clients with and without compression share channels; raw sockets
check what is on the wire (RSV1, the compressed payload) and send crafted
compressed frames (bombs, the size limit, invalid data).
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest
import warpsocket
from helpers import OP_BINARY, OP_CLOSE, OP_TEXT, RawConn, build_frame, connect, new_chat_room, recv
from warpsocket.cli import build_parser

OFFER = "permessage-deflate; client_max_window_bits"

# Commands in text: "join" subscribes the sender to "room", "virtual PREFIX" makes a
# virtual socket of it with that prefix in "room", "room TEXT" broadcasts TEXT to "room";
# anything else is echoed. Every command is acknowledged so clients can wait for it.
ROOM_WORKER = """
import warpsocket

def handle_text_message(text, socket_id):
    if text == "join":
        warpsocket.subscribe(socket_id, "room")
        warpsocket.send(socket_id, "joined")
    elif text.startswith("virtual "):
        vid = warpsocket.create_virtual_socket(socket_id, text[len("virtual "):])
        warpsocket.subscribe(vid, "room")
        warpsocket.send(socket_id, "joined")
    elif text.startswith("room "):
        warpsocket.send("room", text[len("room "):])
    else:
        warpsocket.send(socket_id, text)

def handle_binary_message(data, socket_id):
    warpsocket.send(socket_id, data)
"""


def chat_json(size: int) -> str:
    """Chat-shaped JSON of at least ``size`` characters: it compresses well."""
    line = '{"type":"message","room":"lobby","from":"ada","text":"hello everyone","ts":1700000000}'
    return "[" + ",".join([line] * (size // len(line) + 1)) + "]"


def deflate(data: bytes, level: int = 6) -> bytes:
    """``data`` compressed as one permessage-deflate message (tail removed)."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate(payload: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


def read_raw_frame(conn: RawConn) -> tuple[int, int, bytes]:
    """``(first byte, opcode, payload)`` of the next frame, RSV bits kept."""
    b0, b1 = conn.recv_exact(2)
    length = b1 & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", conn.recv_exact(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", conn.recv_exact(8))
    return b0, b0 & 0x0F, conn.recv_exact(length)


def read_message(conn: RawConn) -> tuple[bool, bytes]:
    """``(compressed, payload as sent)`` of the next data frame (skips pings)."""
    while True:
        b0, opcode, payload = read_raw_frame(conn)
        if opcode in (OP_TEXT, OP_BINARY):
            assert b0 & 0x80, "server messages are not fragmented"
            return bool(b0 & 0x40), payload
        assert opcode != OP_CLOSE, f"closed: {payload!r}"


def raw_ask(conn: RawConn, text: str) -> bytes:
    conn.send_frame(OP_TEXT, text)
    compressed, payload = read_message(conn)
    return inflate(payload) if compressed else payload


def extensions(ws) -> str | None:
    return ws.response.headers.get("Sec-WebSocket-Extensions")


@pytest.fixture
def room_server(start_server):
    return start_server(ROOM_WORKER, compression=True)


def test_compressed_and_plain_clients_share_a_channel(room_server):
    deflating = [connect(room_server, compression="deflate") for _ in range(3)]
    plain = connect(room_server)
    clients = [*deflating, plain]
    try:
        for ws in deflating:
            assert "permessage-deflate" in extensions(ws)
        assert extensions(plain) is None
        for ws in clients:
            ws.send("join")
            assert recv(ws) == "joined"
        message = chat_json(2000)
        before = warpsocket.stats()
        deflating[0].send("room " + message)
        for ws in clients:
            assert recv(ws) == message
        after = warpsocket.stats()
        # Compressed once for the three clients that negotiated it; byte counts are
        # uncompressed payload (the echoed command counts as received bytes).
        assert after["messages_compressed"] - before["messages_compressed"] == 1
        assert after["bytes_out"] - before["bytes_out"] == 4 * len(message)
    finally:
        for ws in clients:
            ws.close()


def test_each_client_gets_its_form_on_the_wire(room_server):
    with RawConn(room_server.port) as deflating, RawConn(room_server.port) as plain:
        agreed = deflating.handshake(extra_headers={"Sec-WebSocket-Extensions": OFFER})
        assert agreed["sec-websocket-extensions"] == (
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        )
        assert "sec-websocket-extensions" not in plain.handshake()
        assert raw_ask(deflating, "join") == b"joined"
        assert raw_ask(plain, "join") == b"joined"
        message = chat_json(1000).encode()
        deflating.send_frame(OP_TEXT, b"room " + message)
        compressed, payload = read_message(deflating)
        assert compressed and len(payload) < len(message) / 4
        assert inflate(payload) == message
        assert read_message(plain) == (False, message)
        # Short messages are not worth compressing.
        deflating.send_frame(OP_TEXT, b"room short")
        assert read_message(deflating) == (False, b"short")
        assert read_message(plain) == (False, b"short")


def test_virtual_socket_prefix_is_compressed_with_the_payload(room_server):
    with RawConn(room_server.port) as conn:
        conn.handshake(extra_headers={"Sec-WebSocket-Extensions": OFFER})
        assert raw_ask(conn, "virtual v1|") == b"joined"
        message = chat_json(500).encode()
        before = warpsocket.stats()["messages_compressed"]
        conn.send_frame(OP_TEXT, deflate(b"room " + message), rsv=0b100)
        compressed, payload = read_message(conn)
        assert compressed
        assert inflate(payload) == b"v1|" + message
        assert warpsocket.stats()["messages_compressed"] == before + 1


def test_compression_false_never_negotiates(start_server):
    server = start_server()
    ws = connect(server, compression="deflate")
    try:
        assert extensions(ws) is None
        assert ws.send(chat_json(500)) is None
        assert recv(ws) == chat_json(500)
    finally:
        ws.close()
    # RSV1 without negotiation is a protocol error.
    with RawConn(server.port) as conn:
        conn.handshake(extra_headers={"Sec-WebSocket-Extensions": OFFER})
        conn.send_frame(OP_TEXT, deflate(b"hello"), rsv=0b100)
        assert conn.read_close()[0] == 1002


@pytest.mark.parametrize(
    "offer",
    [
        "x-webkit-deflate-frame",
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; unknown_param",
        'permessage-deflate; client_max_window_bits="',
    ],
)
def test_unacceptable_offers_are_declined_not_refused(room_server, offer):
    with RawConn(room_server.port) as conn:
        headers = conn.handshake(extra_headers={"Sec-WebSocket-Extensions": offer})
        assert "sec-websocket-extensions" not in headers
        assert raw_ask(conn, "plain") == b"plain"
        conn.send_frame(OP_TEXT, deflate(b"hello"), rsv=0b100)
        assert conn.read_close()[0] == 1002


def test_rsv1_on_a_continuation_frame_is_a_protocol_error(room_server):
    with RawConn(room_server.port) as conn:
        conn.handshake(extra_headers={"Sec-WebSocket-Extensions": OFFER})
        compressed = deflate(b"hello hello")
        conn.sendall(build_frame(OP_TEXT, compressed[:3], fin=False, rsv=0b100))
        conn.sendall(build_frame(0, compressed[3:], rsv=0b100))
        assert conn.read_close()[0] == 1002


def test_fragmented_compressed_message(room_server):
    with RawConn(room_server.port) as conn:
        conn.handshake(extra_headers={"Sec-WebSocket-Extensions": OFFER})
        message = chat_json(3000).encode()
        compressed = deflate(message)
        third = len(compressed) // 3
        conn.sendall(build_frame(OP_TEXT, compressed[:third], fin=False, rsv=0b100))
        conn.sendall(build_frame(0, compressed[third : 2 * third], fin=False))
        conn.sendall(build_frame(0, compressed[2 * third :]))
        compressed_reply, payload = read_message(conn)
        assert compressed_reply
        assert inflate(payload) == message


LIMIT = 4096


@pytest.mark.parametrize("binary", [False, True])
def test_the_limit_is_on_the_decompressed_size(start_server, binary):
    server = start_server(compression=True, max_message_size=LIMIT)
    opcode = OP_BINARY if binary else OP_TEXT
    # Incompressible at the limit: its compressed frame is a little larger, and fits.
    noise = os.urandom(LIMIT // 2).hex().encode()[:LIMIT] if not binary else os.urandom(LIMIT)
    for message in (b"a" * LIMIT, noise):
        with RawConn(server.port) as conn:
            conn.handshake(extra_headers={"Sec-WebSocket-Extensions": OFFER})
            conn.send_frame(opcode, deflate(message), rsv=0b100)
            compressed, payload = read_message(conn)
            assert (inflate(payload) if compressed else payload) == message
    with RawConn(server.port) as conn:
        conn.handshake(extra_headers={"Sec-WebSocket-Extensions": OFFER})
        conn.send_frame(opcode, deflate(b"a" * (LIMIT + 1)), rsv=0b100)
        assert conn.read_close()[0] == 1009


def peak_rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/self/status")


def test_a_deflate_bomb_is_refused_without_inflating_it(start_server):
    server = start_server(compression=True, max_message_size=1 << 20)
    # 512 MiB of zeros, compressed piecewise so the test never holds them either.
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1 << 20)
    bomb = b"".join(compressor.compress(zeros) for _ in range(512))
    bomb += compressor.flush(zlib.Z_SYNC_FLUSH)[:-4]
    assert len(bomb) < 1 << 20, "small enough to pass the compressed-size check"
    # Resets the peak resident size (Linux: "5" to clear_refs), so the check below
    # sees only what inflating the bomb cost.
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = peak_rss_kib()
    with RawConn(server.port) as conn:
        conn.handshake(extra_headers={"Sec-WebSocket-Extensions": OFFER})
        conn.send_frame(OP_BINARY, bomb, rsv=0b100)
        assert conn.read_close()[0] == 1009
    grown = peak_rss_kib() - before
    assert grown < 64 * 1024, f"peak resident size grew by {grown} KiB"


# Block type 3 is reserved (RFC 1951 §3.2.3); the second is a stored block whose
# length and its complement disagree.
@pytest.mark.parametrize("garbage", [b"\x07\x00", b"\x00\x05\x00\x00\x00abcde"])
def test_invalid_compressed_data_closes_with_1007(room_server, garbage):
    with RawConn(room_server.port) as conn:
        conn.handshake(extra_headers={"Sec-WebSocket-Extensions": OFFER})
        conn.send_frame(OP_BINARY, garbage, rsv=0b100)
        assert conn.read_close()[0] == 1007


def test_invalid_utf8_inside_compressed_text_closes_with_1007(room_server):
    with RawConn(room_server.port) as conn:
        conn.handshake(extra_headers={"Sec-WebSocket-Extensions": OFFER})
        conn.send_frame(OP_TEXT, deflate(b"abc\xff" * 100), rsv=0b100)
        assert conn.read_close()[0] == 1007


def test_websockets_client_round_trip_with_compression(room_server):
    ws = connect(room_server, compression="deflate")
    try:
        for size in (10, 200, 70_000):
            message = chat_json(size)
            ws.send(message)
            assert recv(ws) == message
        data = json.dumps({"blob": "x" * 5000}).encode()
        ws.send(data)
        assert recv(ws) == data
    finally:
        ws.close()


def test_cli_flag():
    parser = build_parser()
    assert parser.parse_args(["w.py", "--compression"]).compression is True
    assert parser.parse_args(["w.py"]).compression is False


def test_chromium_negotiates_compression_with_the_chat(start_server, tmp_path):
    from test_chat_browser import CHAT_HISTORY, CHAT_STATIC, CHAT_WORKER, Page, chromium, require_browser

    require_browser()

    server = start_server(
        worker=str(CHAT_WORKER), static_dir=str(CHAT_STATIC), history=CHAT_HISTORY, compression=True
    )
    driver = chromium(tmp_path / "profile")
    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        page = Page(driver)
        page.login("ada")
        assert "permessage-deflate" in page.js("return ws.extensions")
        page.join(new_chat_room())
        before = warpsocket.stats()["messages_compressed"]
        # The room's broadcast of it (JSON, prefixed with the room) is long enough to
        # be compressed; the page shows it only once it has inflated it.
        text = "a message long enough to be worth compressing " * 5
        page.say(text.strip())
        assert warpsocket.stats()["messages_compressed"] > before
        assert page.console_errors() == []
    finally:
        driver.quit()
