"""Hostile and malformed client input: right close code, nothing allocated, others unaffected.

tests/test_protocol.py already checks the basic cases (unmasked text frame, RSV1, opcodes 0x3
and 0xB, continuation first, text inside text, fragmented or 126-byte ping, invalid UTF-8,
1009 with payload). This file covers the rest of RFC 6455's failure cases (every reserved bit
and opcode, close codes and payloads, unmasked control and continuation frames, 64-bit lengths)
and checks what those tests do not: that a connected bystander keeps getting echo round-trips
*while* hostile connections are being failed and afterwards, and that a frame announcing a
huge length is refused from its header alone, without the server reserving or touching memory
for it (the server runs in this process, so /proc/self/status is the server's).
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time

import pytest
from helpers import (
    ECHO_WORKER,
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
)

MASK = b"\x01\x02\x03\x04"


def frame(opcode, payload=b"", **kwargs):
    return build_frame(opcode, payload, **kwargs)


def raw_header(first_byte, length, mask=True):
    """A frame header announcing ``length`` bytes (64-bit form), with no payload after it."""
    return struct.pack("!BBQ", first_byte, (0x80 if mask else 0) | 127, length) + (MASK if mask else b"")


class Bystander:
    """A client connected before the hostile ones, doing echo round-trips in a thread."""

    def __init__(self, server):
        self.ws = connect(server)
        assert ask(self.ws, "hello") == "hello"
        self.rounds = 0
        self.errors = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bystander", daemon=True)

    def _loop(self):
        n = 0
        while not self._stop.is_set():
            n += 1
            text = f"round {n}"
            try:
                answer = ask(self.ws, text, timeout=10)
            except Exception as exc:  # reported by stop()
                self.errors.append(repr(exc))
                return
            if answer != text:
                self.errors.append(f"echo of {text!r} was {answer!r}")
                return
            self.rounds += 1
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)
        with contextlib.suppress(Exception):
            self.ws.close()

    def check(self):
        """Fail if an echo went wrong so far; then do one more round-trip."""
        assert not self.errors, self.errors
        start = self.rounds
        deadline = time.monotonic() + 20
        while self.rounds == start:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, "bystander got no echo for 20 s"
            time.sleep(0.01)


def expect_failed_with(server, data, code, *, what):
    """Open a raw connection, send ``data`` after the handshake, expect a close ``code``."""
    with RawConn(server.port) as raw:
        raw.handshake()
        raw.send_frame(OP_TEXT, "before")  # the connection works until the bad bytes
        assert raw.read_message() == (OP_TEXT, b"before"), what
        raw.sendall(data)
        got, reason = raw.read_close()
        assert got == code, f"{what}: expected close {code}, got {got} ({reason!r})"
        # the server then closes the TCP connection
        assert raw.wait_eof(timeout=20), f"{what}: TCP connection left open"


@pytest.fixture
def server(start_server):
    return start_server(ECHO_WORKER, threads=2)


# ---------------------------------------------------------------- header bits and opcodes


def test_every_reserved_bit_combination_closes_1002(server):
    with Bystander(server) as bystander:
        for rsv in range(1, 8):
            for opcode in (OP_TEXT, OP_BINARY, OP_PING):
                expect_failed_with(
                    server, frame(opcode, b"x", rsv=rsv), 1002, what=f"rsv={rsv:03b} opcode={opcode}"
                )
            bystander.check()
        # reserved bits on a continuation frame of a well-started message
        expect_failed_with(
            server, frame(OP_TEXT, b"a", fin=False) + frame(OP_CONT, b"b", rsv=0b100), 1002, what="rsv cont"
        )
        bystander.check()


def test_every_reserved_opcode_closes_1002(server):
    with Bystander(server) as bystander:
        for opcode in (0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF):
            expect_failed_with(server, frame(opcode, b""), 1002, what=f"opcode {opcode:#x} empty")
            expect_failed_with(server, frame(opcode, b"payload"), 1002, what=f"opcode {opcode:#x}")
            # inside a fragmented message too
            expect_failed_with(
                server,
                frame(OP_BINARY, b"a", fin=False) + frame(opcode, b"b"),
                1002,
                what=f"opcode {opcode:#x} in a fragmented message",
            )
            bystander.check()


# ---------------------------------------------------------------- control frames


def test_control_frames_over_125_bytes_or_fragmented_close_1002(server):
    cases = {
        "pong 126": frame(OP_PONG, b"p" * 126),
        "close 126": frame(OP_CLOSE, close_payload(1000, "r" * 124)),
        "ping 65535 (16-bit length)": frame(OP_PING, b"p" * 65535),
        "fragmented pong": frame(OP_PONG, b"p", fin=False),
        "fragmented close": frame(OP_CLOSE, close_payload(1000), fin=False),
        "fragmented empty ping": frame(OP_PING, b"", fin=False),
        "fragmented ping inside a fragmented message": frame(OP_TEXT, b"a", fin=False)
        + frame(OP_PING, b"p", fin=False),
        "ping announcing 2**62 bytes": raw_header(0x80 | OP_PING, 1 << 62),
    }
    with Bystander(server) as bystander:
        for what, data in cases.items():
            expect_failed_with(server, data, 1002, what=what)
            bystander.check()


def test_control_frame_of_exactly_125_bytes_is_fine(server):
    with RawConn(server.port) as raw:
        raw.handshake()
        raw.send_frame(OP_PING, b"p" * 125)
        assert raw.read_frame() == (True, OP_PONG, b"p" * 125)


# ---------------------------------------------------------------- fragmentation


def test_bad_fragmentation_closes_1002(server):
    cases = {
        "continuation without start, not final": frame(OP_CONT, b"x", fin=False),
        "continuation after a complete message": frame(OP_TEXT, b"done") + frame(OP_CONT, b"x"),
        "empty continuation without start": frame(OP_CONT, b""),
        "binary inside text": frame(OP_TEXT, b"a", fin=False) + frame(OP_BINARY, b"b"),
        "text inside binary": frame(OP_BINARY, b"a", fin=False) + frame(OP_TEXT, b"b"),
        "non-final text inside text": frame(OP_TEXT, b"a", fin=False) + frame(OP_TEXT, b"b", fin=False),
        "new message after continuations": frame(OP_TEXT, b"a", fin=False)
        + frame(OP_CONT, b"b", fin=False)
        + frame(OP_PING, b"")
        + frame(OP_BINARY, b"c"),
    }
    with Bystander(server) as bystander:
        for what, data in cases.items():
            expect_failed_with(server, data, 1002, what=what)
            bystander.check()


# ---------------------------------------------------------------- UTF-8


def test_invalid_utf8_closes_1007(server):
    cases = {
        "lone continuation byte": frame(OP_TEXT, b"\x80"),
        "overlong slash": frame(OP_TEXT, b"\xc0\xaf"),
        "surrogate U+D800": frame(OP_TEXT, b"\xed\xa0\x80"),
        "above U+10FFFF": frame(OP_TEXT, b"\xf4\x90\x80\x80"),
        "0xFF": frame(OP_TEXT, b"a\xffb"),
        "truncated at the end of the message": frame(OP_TEXT, b"ok \xe2\x82"),
        "truncated at the end of the last fragment": frame(OP_TEXT, b"ok ", fin=False)
        + frame(OP_CONT, b"\xe2", fin=False)
        + frame(OP_CONT, b"\x82"),
        "bad byte in the third fragment": frame(OP_TEXT, b"abc", fin=False)
        + frame(OP_CONT, "€".encode()[:2], fin=False)
        + frame(OP_CONT, b"\x28"),
        "invalid close reason": frame(OP_CLOSE, close_payload(1000) + b"\xff"),
        "close reason cut inside a character": frame(OP_CLOSE, close_payload(1000) + "é".encode()[:1]),
    }
    with Bystander(server) as bystander:
        for what, data in cases.items():
            expect_failed_with(server, data, 1007, what=what)
            bystander.check()


def test_invalid_utf8_in_a_first_fragment_fails_without_waiting_for_the_rest(server):
    # fail fast: the message is never finished, yet the connection must be failed
    with RawConn(server.port) as raw:
        raw.handshake()
        raw.send_frame(OP_TEXT, b"fine so far \xf0\x28\x8c\x28", fin=False)
        assert raw.read_close()[0] == 1007


def test_utf8_character_split_over_three_fragments_is_valid(server):
    text = "a\U0001f600b"
    encoded = text.encode()
    with RawConn(server.port) as raw:
        raw.handshake()
        raw.send_frame(OP_TEXT, encoded[:2], fin=False)  # "a" + first byte of the emoji
        raw.send_frame(OP_CONT, encoded[2:4], fin=False)
        raw.send_frame(OP_CONT, encoded[4:], fin=True)
        assert raw.read_message() == (OP_TEXT, encoded)


# ---------------------------------------------------------------- close frames


@pytest.mark.parametrize("payload", [b"\x03", b"\x00"], ids=["0x03", "0x00"])
def test_close_payload_of_one_byte_closes_1002(server, payload):
    with Bystander(server) as bystander:
        expect_failed_with(server, frame(OP_CLOSE, payload), 1002, what=f"close payload {payload!r}")
        bystander.check()


def test_invalid_close_codes_close_1002(server):
    # 1004-1006 and 1015 are reserved and must never be sent on the wire; below 1000 and
    # 1016-2999 are not assigned; 5000 and above do not exist.
    invalid = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
    with Bystander(server) as bystander:
        for code in invalid:
            expect_failed_with(server, frame(OP_CLOSE, close_payload(code)), 1002, what=f"close code {code}")
            expect_failed_with(
                server, frame(OP_CLOSE, close_payload(code, "why")), 1002, what=f"close code {code}+reason"
            )
        bystander.check()


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4000, 4999])
def test_valid_close_codes_are_echoed(server, code):
    with RawConn(server.port) as raw:
        raw.handshake()
        raw.send_frame(OP_CLOSE, close_payload(code, "bye"))
        assert raw.read_close()[0] == code
        assert raw.wait_eof(timeout=20)


def test_empty_close_gets_empty_close(server):
    with RawConn(server.port) as raw:
        raw.handshake()
        raw.send_frame(OP_CLOSE, b"")
        assert raw.read_frame() == (True, OP_CLOSE, b"")
        assert raw.wait_eof(timeout=20)


# ---------------------------------------------------------------- masking


def test_unmasked_control_and_continuation_frames_close_1002(server):
    cases = {
        "unmasked ping": frame(OP_PING, b"p", mask=False),
        "unmasked pong": frame(OP_PONG, b"", mask=False),
        "unmasked close": frame(OP_CLOSE, close_payload(1000), mask=False),
        "unmasked binary": frame(OP_BINARY, b"b", mask=False),
        "unmasked empty text": frame(OP_TEXT, b"", mask=False),
        "unmasked continuation": frame(OP_TEXT, b"a", fin=False) + frame(OP_CONT, b"b", mask=False),
        "unmasked 64-bit header": raw_header(0x82, 1 << 20, mask=False),
    }
    with Bystander(server) as bystander:
        for what, data in cases.items():
            expect_failed_with(server, data, 1002, what=what)
            bystander.check()


# ---------------------------------------------------------------- lengths and memory


def test_64_bit_length_with_top_bit_set_closes_1002(server):
    with Bystander(server) as bystander:
        for length in (1 << 63, (1 << 64) - 1, (1 << 63) + 5):
            for first in (0x80 | OP_BINARY, 0x80 | OP_TEXT, OP_BINARY):
                expect_failed_with(
                    server, raw_header(first, length), 1002, what=f"length {length:#x} first {first:#x}"
                )
            bystander.check()


def proc_status_kib():
    """VmRSS, VmHWM (peak RSS) and VmSize of this process (the server's), in KiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "VmSize"):
                values[name] = int(rest.split()[0])
    return values


@pytest.mark.parametrize(
    "max_message_size",
    [None, 1 << 20],
    ids=["default 16 MiB", "1 MiB"],
)
def test_huge_announced_length_closes_1009_without_allocating(start_server, max_message_size):
    kwargs = {} if max_message_size is None else {"max_message_size": max_message_size}
    server = start_server(ECHO_WORKER, threads=2, **kwargs)
    limit = max_message_size or 16 << 20
    announced = [limit + 1, 1 << 30, 1 << 36, (1 << 63) - 1]
    with Bystander(server) as bystander:
        # warm up: every worker and I/O thread has allocated its buffers and arenas
        for _ in range(4):
            expect_failed_with(server, raw_header(0x82, 1 << 30), 1009, what="warm-up")
        bystander.check()
        before = proc_status_kib()
        for length in announced:
            for what, data in {
                "binary": raw_header(0x82, length),
                "text": raw_header(0x81, length),
                "non-final binary": raw_header(0x02, length),
                # the second fragment's length pushes the total over the limit
                "continuation": frame(OP_BINARY, b"x" * 100, fin=False) + raw_header(0x80, length - 50),
            }.items():
                # only the header is sent: the close must come without any payload
                expect_failed_with(server, data, 1009, what=f"{what} announcing {length} bytes")
            bystander.check()
        after = proc_status_kib()
    grown = {name: after[name] - before[name] for name in after}
    # 1 GiB and 64 GiB were announced: nothing like it may be reserved (VmSize) or touched
    # (VmRSS, VmHWM). The bounds leave room for a new malloc arena (64 MiB reserved).
    assert grown["VmSize"] < 512 * 1024, (before, after)
    assert grown["VmRSS"] < 64 * 1024, (before, after)
    assert grown["VmHWM"] < 64 * 1024, (before, after)


def test_slow_huge_message_payload_is_not_buffered_beyond_the_limit(start_server):
    # a frame just over the limit whose payload trickles in: failed at the header already
    server = start_server(ECHO_WORKER, threads=2, max_message_size=64 * 1024)
    with Bystander(server) as bystander, RawConn(server.port) as raw:
        raw.handshake()
        raw.sendall(raw_header(0x82, 64 * 1024 + 1))
        assert raw.read_close()[0] == 1009
        bystander.check()


# ---------------------------------------------------------------- stalling and garbage


def test_stalled_and_garbage_connections_do_not_disturb_others(server):
    stalled = []
    try:
        with Bystander(server) as bystander:
            # connections that stop mid-handshake, mid-header and mid-payload, and stay open
            for partial in (b"GET / HTTP/1.1\r\nHost: x\r\n", None, b"\x82", b"\x82\xfe\x00"):
                conn = RawConn(server.port)
                stalled.append(conn)
                if partial is None or not partial.startswith(b"GET"):
                    conn.handshake()
                if partial:
                    conn.sendall(partial)
            conn = RawConn(server.port)
            stalled.append(conn)
            conn.handshake()
            half_sent = frame(OP_BINARY, b"x" * 1000)
            conn.sendall(half_sent[:500])
            bystander.check()
            # garbage after the handshake: all bits set is RSV + a reserved opcode
            expect_failed_with(server, b"\xff" * 64, 1002, what="0xff garbage")
            # an HTTP request where frames are expected: 'G' = 0x47 has RSV bits set
            expect_failed_with(server, b"GET / HTTP/1.1\r\n\r\n", 1002, what="HTTP after upgrade")
            bystander.check()
            # the connection stalled mid-payload is still served once the frame is finished
            conn.sendall(half_sent[500:])
            assert conn.read_message() == (OP_BINARY, b"x" * 1000)
        # a fresh client is served too
        with connect(server) as ws:
            assert ask(ws, "after") == "after"
    finally:
        for conn in stalled:
            conn.close()
