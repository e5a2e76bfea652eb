"""Outgoing backpressure: a client that stops reading is closed with 1008, its queue freed.

The server runs inside the test process, so the test process's RSS is the
server's memory.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time

import pytest
import warpsocket
from helpers import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawConn,
    ask,
    close_payload,
    connect,
    wait_for,
)
from websockets.exceptions import ConnectionClosed

KIB = 1024
MIB = 1024 * KIB

WORKER = """
import warpsocket

def handle_text_message(text, socket_id):
    if text.startswith("sub "):
        warpsocket.subscribe(socket_id, text[4:])
        warpsocket.send(socket_id, f"subscribed {socket_id}")
    elif text == "sid?":
        warpsocket.send(socket_id, str(socket_id))
    else:
        warpsocket.send(socket_id, text)

def handle_binary_message(data, socket_id):
    warpsocket.send(socket_id, data)
"""


def assert_backpressure_warning(handler):
    """A WARNING record on logger ``warpsocket`` about the 1008 close."""
    wait_for(
        lambda: [r for r in handler.records if r.levelno == logging.WARNING and "1008" in r.getMessage()],
        timeout=10,
        message="a warning about the 1008 close on logger warpsocket",
    )


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def slow_raw_conn(port, rcvbuf=32 * KIB, timeout=30.0):
    """A RawConn whose socket has a small, fixed receive buffer (no autotuning)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    conn = RawConn.__new__(RawConn)
    conn.sock = sock
    conn.buf = b""
    conn.port = port
    return conn


def raw_ask(raw, text):
    raw.send_frame(OP_TEXT, text)
    opcode, payload = raw.read_message()
    assert opcode == OP_TEXT
    return payload.decode()


def drain_until_close(raw, timeout=30.0):
    """Read everything the server still sends; return (close code, data frames read)."""
    raw.sock.settimeout(timeout)
    frames = 0
    try:
        while True:
            _fin, opcode, payload = raw.read_frame()
            if opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                return code, frames
            if opcode in (OP_PING, OP_PONG):
                continue
            frames += 1
    except (EOFError, ConnectionResetError):
        return None, frames


class Reader(threading.Thread):
    """Reads binary broadcasts (8-byte big-endian sequence number first) on a websockets client."""

    def __init__(self, ws):
        super().__init__(daemon=True)
        self.ws = ws
        self.seqs = []
        self.received_at = {}
        self.error = None
        self.closed_with = None

    def run(self):
        try:
            while True:
                msg = self.ws.recv(timeout=60)
                if msg == "bye":
                    return
                (seq,) = struct.unpack("!Q", msg[:8])
                self.received_at[seq] = time.monotonic()
                self.seqs.append(seq)
        except ConnectionClosed as exc:
            self.closed_with = exc.rcvd.code if exc.rcvd else None
        except BaseException as exc:  # reported to the test
            self.error = exc


@pytest.mark.timeout(180)
def test_non_reading_client_closed_1008_others_unaffected(start_server, warpsocket_log):
    server = start_server(WORKER, threads=2, max_backpressure=1 * MIB)
    before = warpsocket.stats()["backpressure_closes"]
    msg_size = 256 * KIB
    count = 400  # 100 MiB attempted towards the stalled client
    slow = slow_raw_conn(server.port)
    fast = connect(server, max_size=None)
    reader = None
    try:
        slow.handshake()
        slow_sid = int(raw_ask(slow, "sid?"))
        assert raw_ask(slow, "sub news") == f"subscribed {slow_sid}"
        assert fast.send("sub news") is None
        fast_sid = int(fast.recv(timeout=20).split()[1])
        assert fast_sid != slow_sid
        # from now on the raw client reads nothing
        reader = Reader(fast)
        reader.start()

        rss_before = rss_bytes()
        rss_peak = rss_before
        returns = []
        sent_at = {}
        body = bytes(msg_size - 8)
        t_start = time.monotonic()
        for seq in range(count):
            payload = struct.pack("!Q", seq) + body
            sent_at[seq] = time.monotonic()
            returns.append(warpsocket.send("news", payload))
            # pace on the reading client: one broadcast in flight, so its queue holds at most
            # this one and the next (256 KiB each) even when the writer is descheduled between
            # a write and counting it as written (a loaded 2-core machine, free-threaded build)
            wait_for(
                lambda seq=seq: (
                    reader.error is not None or reader.closed_with is not None or len(reader.seqs) > seq
                ),
                timeout=20,
                interval=0.001,
                message=f"reading client to receive broadcast {seq}",
            )
            assert reader.error is None, reader.error
            assert reader.closed_with is None, f"reading client was closed with {reader.closed_with}"
            if seq % 16 == 0:
                rss_peak = max(rss_peak, rss_bytes())
        elapsed = time.monotonic() - t_start
        wait_for(lambda: len(reader.seqs) == count or reader.error or reader.closed_with, timeout=30)
        assert reader.error is None, reader.error
        assert reader.closed_with is None, f"reading client was closed with {reader.closed_with}"
        rss_peak = max(rss_peak, rss_bytes())

        # the reading client got every broadcast, in order, promptly
        assert reader.seqs == list(range(count))
        latencies = [reader.received_at[s] - sent_at[s] for s in range(count)]
        assert max(latencies) < 5.0, f"slowest broadcast took {max(latencies):.2f}s"
        assert elapsed < 90, f"{count} broadcasts of 256 KiB took {elapsed:.1f}s"

        # the stalled client stopped being a recipient at some point: closed for backpressure
        assert returns[0] == 2
        assert returns[-1] == 1, "the non-reading client still counts as a recipient"
        first_drop = returns.index(1)
        assert all(r == 1 for r in returns[first_drop:]), returns
        assert warpsocket.send(slow_sid, b"x") == 0
        assert warpsocket.close(slow_sid) is False
        assert warpsocket.stats()["backpressure_closes"] == before + 1

        # memory: the discarded queue was freed, far below the 100 MiB attempted
        growth = rss_peak - rss_before
        assert growth < 40 * MIB, f"RSS grew by {growth / MIB:.1f} MiB"

        # the stalled client's connection ends (the 1008 close frame itself is checked in
        # test_stalled_client_reads_1008_close_after_draining)
        code, frames = drain_until_close(slow)
        assert code in (1008, None), f"expected close 1008, got {code} after {frames} frames"
        assert frames < first_drop
        if code == 1008:
            try:
                slow.send_frame(OP_CLOSE, close_payload(1008))
            except OSError:
                pass
        assert slow.wait_eof(timeout=20)

        # the reading client is still fine
        fast.send("bye")
        reader.join(timeout=20)
        assert ask(fast, "still here") == "still here"
        wait_for(lambda: warpsocket.stats()["connections"] == 1, message="only the reading client left")
        assert_backpressure_warning(warpsocket_log)
    finally:
        slow.close()
        fast.close()
        if reader is not None:
            reader.join(timeout=20)


def test_burst_below_limit_is_not_closed(start_server):
    server = start_server(WORKER, threads=1, max_backpressure=1 * MIB)
    before = warpsocket.stats()["backpressure_closes"]
    with slow_raw_conn(server.port) as raw:
        raw.handshake()
        sid = int(raw_ask(raw, "sid?"))
        # 3 x 256 KiB queued while the client reads nothing: under the 1 MiB limit
        for i in range(3):
            assert warpsocket.send(sid, bytes([i]) * (256 * KIB)) == 1
        time.sleep(1.0)
        assert warpsocket.stats()["backpressure_closes"] == before
        for i in range(3):
            opcode, payload = raw.read_message()
            assert opcode == OP_BINARY
            assert payload == bytes([i]) * (256 * KIB)
        assert raw_ask(raw, "alive") == "alive"
    assert warpsocket.stats()["backpressure_closes"] == before


def test_stalled_client_reads_1008_close_after_draining(start_server, warpsocket_log):
    server = start_server(WORKER, threads=1, max_backpressure=256 * KIB)
    before = warpsocket.stats()["backpressure_closes"]
    with slow_raw_conn(server.port, rcvbuf=16 * KIB) as raw, connect(server) as other:
        raw.handshake()
        sid = int(raw_ask(raw, "sid?"))
        chunk = bytes(64 * KIB)
        results = []
        deadline = time.monotonic() + 30
        # far more than the kernel buffers plus the limit can hold
        while time.monotonic() < deadline and len(results) < 2000:
            results.append(warpsocket.send(sid, chunk))
            if results[-1] == 0:
                break
            time.sleep(0.001)
        assert results[-1] == 0, "the stalled client was never closed for backpressure"
        assert all(r == 1 for r in results[:-1])
        # later sends keep returning 0
        assert warpsocket.send(sid, "more") == 0
        assert warpsocket.send([sid, sid], b"more") == 0
        assert warpsocket.stats()["backpressure_closes"] == before + 1
        assert ask(other, "ok") == "ok"
        # once it reads again: what had been written already, then the close frame 1008
        code, frames = drain_until_close(raw)
        assert code == 1008, f"expected a close frame 1008, got {code} after {frames} data frames"
        assert frames < len(results)
        raw.send_frame(OP_CLOSE, close_payload(1008))
        assert raw.wait_eof(timeout=20)
    assert_backpressure_warning(warpsocket_log)
