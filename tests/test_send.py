"""warpsocket.send / warpsocket.close from the main thread, worker threads and user threads."""

from __future__ import annotations

import socket
import threading

import pytest
import warpsocket
from helpers import (
    LOGGING_PRELUDE,
    OP_BINARY,
    RawConn,
    ask,
    connect,
    expect_close,
    read_lines,
    wait_for,
)

LOGGING_SID_WORKER = (
    LOGGING_PRELUDE
    + """
import threading

def handle_text_message(text, socket_id):
    if text == "sid?":
        warpsocket.send(socket_id, str(socket_id))
    elif text == "close-me":
        result = warpsocket.close(socket_id, 4003, "self")
        log("closed-from-handler", socket_id, result, warpsocket.send(socket_id, "after close"))
    elif text == "burst":
        for i in range(1000):
            warpsocket.send(socket_id, f"w{i}")
        warpsocket.send(socket_id, "burst-done")
    elif text == "spawn":
        def run():
            counts = [warpsocket.send(socket_id, f"t{i}") for i in range(200)]
            warpsocket.send(socket_id, f"thread-done {sum(counts)} {threading.current_thread().name}")
        threading.Thread(target=run, name="user-thread").start()
    else:
        warpsocket.send(socket_id, text)

def handle_close(socket_id):
    log("close", socket_id)
"""
)


@pytest.fixture
def server(start_server, log_path):
    return start_server(LOGGING_SID_WORKER, threads=2, worker_arg=str(log_path))


def sid_of(ws):
    return int(ask(ws, "sid?"))


# ---------------------------------------------------------------- send


def test_send_data_types(server):
    with connect(server) as ws:
        sid = sid_of(ws)
        assert warpsocket.send(sid, "text") == 1
        assert warpsocket.send(sid, b"bin") == 1
        assert warpsocket.send(sid, bytearray(b"ba")) == 1
        assert warpsocket.send(sid, memoryview(b"__mv__")[2:4]) == 1
        assert warpsocket.send(sid, "") == 1
        received = [ws.recv(timeout=20) for _ in range(5)]
    assert received == ["text", b"bin", b"ba", b"mv", ""]
    assert isinstance(received[0], str)
    assert all(isinstance(r, bytes) for r in received[1:4])


def test_send_to_list_and_duplicates(server):
    with connect(server) as a, connect(server) as b:
        sa, sb = sid_of(a), sid_of(b)
        assert warpsocket.send([sa, sb], "both") == 2
        assert a.recv(timeout=20) == "both"
        assert b.recv(timeout=20) == "both"
        assert warpsocket.send([sa, sa], "twice") == 2
        assert a.recv(timeout=20) == "twice"
        assert a.recv(timeout=20) == "twice"
        assert warpsocket.send([sa, 10**15, sb], b"mixed") == 2
        assert a.recv(timeout=20) == b"mixed"
        assert b.recv(timeout=20) == b"mixed"
        # b got exactly one copy of "both" and nothing unexpected
        assert ask(b, "ping") == "ping"


def test_send_unknown_ids_count_zero(server):
    assert warpsocket.send(10**15, "nobody") == 0
    assert warpsocket.send([10**15, 10**15 + 1], "nobody") == 0
    assert warpsocket.send([], "nobody") == 0


def test_send_from_main_thread_preserves_order(server):
    with connect(server) as ws:
        sid = sid_of(ws)
        for i in range(1000):
            assert warpsocket.send(sid, f"m{i}") == 1
        got = [ws.recv(timeout=30) for _ in range(1000)]
    assert got == [f"m{i}" for i in range(1000)]


def test_send_from_non_worker_thread_preserves_order(server):
    with connect(server) as ws:
        sid = sid_of(ws)
        results = []

        def sender():
            results.extend(warpsocket.send(sid, f"n{i}" if i % 2 else f"n{i}".encode()) for i in range(1000))

        t = threading.Thread(target=sender)
        t.start()
        got = [ws.recv(timeout=30) for _ in range(1000)]
        t.join(30)
    assert results == [1] * 1000
    assert got == [f"n{i}" if i % 2 else f"n{i}".encode() for i in range(1000)]


def test_send_from_several_threads_keeps_per_thread_order(server):
    n_threads, per_thread = 4, 250
    with connect(server) as ws:
        sid = sid_of(ws)
        threads = [
            threading.Thread(target=lambda k=k: [warpsocket.send(sid, f"{k}:{i}") for i in range(per_thread)])
            for k in range(n_threads)
        ]
        for t in threads:
            t.start()
        got = [ws.recv(timeout=30) for _ in range(n_threads * per_thread)]
        for t in threads:
            t.join(30)
    for k in range(n_threads):
        mine = [int(m.split(":")[1]) for m in got if m.startswith(f"{k}:")]
        assert mine == list(range(per_thread))


def test_send_from_worker_handler_preserves_order(server):
    with connect(server) as ws:
        ws.send("burst")
        got = [ws.recv(timeout=30) for _ in range(1001)]
    assert got == [f"w{i}" for i in range(1000)] + ["burst-done"]


def test_send_from_user_thread_started_in_worker(server):
    with connect(server) as ws:
        ws.send("spawn")
        got = [ws.recv(timeout=30) for _ in range(201)]
    assert got[:200] == [f"t{i}" for i in range(200)]
    assert got[200] == "thread-done 200 user-thread"


def test_send_after_client_closed_returns_zero(server, log_path):
    ws = connect(server)
    sid = sid_of(ws)
    ws.close()
    wait_for(lambda: f"close {sid}" in read_lines(log_path), message="handle_close")
    assert warpsocket.send(sid, "gone") == 0


# ---------------------------------------------------------------- close


def test_close_default_code(server, log_path):
    with connect(server) as ws:
        sid = sid_of(ws)
        assert warpsocket.close(sid) is True
        code, reason = expect_close(ws)
        assert code == 1000
        assert reason == ""
    assert warpsocket.close(sid) is False
    assert warpsocket.send(sid, "x") == 0
    wait_for(
        lambda: f"close {sid}" in read_lines(log_path),
        message="handle_close after server close",
    )
    assert read_lines(log_path).count(f"close {sid}") == 1
    wait_for(lambda: warpsocket.stats()["connections"] == 0, message="connection to be gone")


def test_close_with_code_and_reason(server):
    with connect(server) as ws:
        sid = sid_of(ws)
        assert warpsocket.close(sid, 4001, "bye") is True
        # from the moment it is closing: sends count 0, close again is False
        assert warpsocket.send(sid, "late") == 0
        assert warpsocket.close(sid, 4002, "again") is False
        code, reason = expect_close(ws)
    assert (code, reason) == (4001, "bye")


def test_close_keyword_arguments(server):
    with connect(server) as ws:
        sid = sid_of(ws)
        assert warpsocket.close(sid, code=4005, reason="kw") is True
        assert expect_close(ws) == (4005, "kw")


def test_close_unknown_id_returns_false(server):
    assert warpsocket.close(10**15) is False


def test_frames_queued_before_close_arrive_first(server):
    with connect(server) as ws:
        sid = sid_of(ws)
        for i in range(500):
            assert warpsocket.send(sid, f"q{i}") == 1
        assert warpsocket.send(sid, b"last-binary") == 1
        assert warpsocket.close(sid, 4002, "end") is True
        got = [ws.recv(timeout=30) for _ in range(501)]
        assert expect_close(ws) == (4002, "end")
    assert got == [f"q{i}" for i in range(500)] + [b"last-binary"]


def test_close_from_inside_handler(server, log_path):
    with connect(server) as ws:
        sid = sid_of(ws)
        ws.send("close-me")
        assert expect_close(ws) == (4003, "self")
    wait_for(lambda: f"close {sid}" in read_lines(log_path), message="handle_close")
    assert f"closed-from-handler {sid} True 0" in read_lines(log_path)


# ---------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    ("call", "exc", "argname"),
    [
        (lambda: warpsocket.send(1.5, "x"), TypeError, "target"),
        (lambda: warpsocket.send(None, "x"), TypeError, "target"),
        (lambda: warpsocket.send(True, "x"), TypeError, "target"),
        (lambda: warpsocket.send(1, 123), TypeError, "data"),
        (lambda: warpsocket.send(1, None), TypeError, "data"),
        (lambda: warpsocket.send(1, ["x"]), TypeError, "data"),
        (lambda: warpsocket.send(0, "x"), ValueError, "target"),
        (lambda: warpsocket.send(-1, "x"), ValueError, "target"),
        (lambda: warpsocket.close("x"), TypeError, "socket_id"),
        (lambda: warpsocket.close(1.0), TypeError, "socket_id"),
        (lambda: warpsocket.close(True), TypeError, "socket_id"),
        (lambda: warpsocket.close(0), ValueError, "socket_id"),
        (lambda: warpsocket.close(-5), ValueError, "socket_id"),
        (lambda: warpsocket.close(1, "1000"), TypeError, "code"),
        (lambda: warpsocket.close(1, 1000, 42), TypeError, "reason"),
    ],
    ids=[
        "send-float",
        "send-none",
        "send-bool",
        "send-int-data",
        "send-none-data",
        "send-list-data",
        "send-zero",
        "send-negative",
        "close-str",
        "close-float",
        "close-bool",
        "close-zero",
        "close-negative",
        "close-str-code",
        "close-int-reason",
    ],
)
def test_bad_arguments(server, call, exc, argname):
    with pytest.raises(exc) as info:
        call()
    assert type(info.value) is exc or issubclass(type(info.value), exc)
    assert argname in str(info.value), f"message should name the argument {argname!r}: {info.value}"


def test_bad_arguments_without_server():
    with pytest.raises(TypeError):
        warpsocket.send(True, "x")
    with pytest.raises(ValueError, match="target"):
        warpsocket.send(0, "x")
    with pytest.raises(TypeError):
        warpsocket.close("x")


def test_functions_work_without_a_running_server():
    assert warpsocket.send(10**15, "x") == 0
    assert warpsocket.send([10**15, 10**15], b"x") == 0
    assert warpsocket.close(10**15) is False
    stats = warpsocket.stats()
    assert stats["connections"] == 0


# ---------------------------------------------------------------- backpressure


@pytest.mark.timeout(180)
def test_backpressure_limit_closes_1008(start_server, log_path):
    server = start_server(
        LOGGING_SID_WORKER,
        threads=1,
        worker_arg=str(log_path),
        max_backpressure=256 * 1024,
    )
    before = warpsocket.stats()["backpressure_closes"]
    raw = RawConn(server.port, timeout=60)
    try:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        raw.handshake()
        raw.send_frame(0x1, "sid?")
        _, payload = raw.read_message()
        sid = int(payload)
        chunk = b"z" * 65536
        sent_bytes = 0
        # the client does not read: the queue grows until the server gives up
        while warpsocket.send(sid, chunk) == 1:
            sent_bytes += len(chunk)
            assert sent_bytes < 512 * 1024 * 1024, "backpressure limit never triggered"
        # closing: further sends count 0 and close() is False
        assert warpsocket.send(sid, chunk) == 0
        assert warpsocket.close(sid) is False
        with connect(server) as other:
            assert ask(other, "unaffected") == "unaffected"
        # whatever was already on the wire is followed by the 1008 close frame
        code, _ = raw.read_close()
        assert code == 1008
    finally:
        raw.close()
    wait_for(
        lambda: f"close {sid}" in read_lines(log_path),
        message="handle_close after 1008",
    )
    assert warpsocket.stats()["backpressure_closes"] >= before + 1


def test_binary_send_via_raw_client(server):
    with RawConn(server.port) as raw:
        raw.handshake()
        raw.send_frame(0x1, "sid?")
        _, payload = raw.read_message()
        sid = int(payload)
        assert warpsocket.send(sid, bytes(range(256))) == 1
        assert raw.read_message() == (OP_BINARY, bytes(range(256)))


def test_send_to_each_of_many_connections(server):
    clients = [connect(server) for _ in range(8)]
    try:
        sids = [sid_of(ws) for ws in clients]
        assert len(set(sids)) == 8
        assert all(sid > 0 for sid in sids)
        assert warpsocket.send(sids, "broadcast") == 8
        for ws in clients:
            assert ws.recv(timeout=20) == "broadcast"
    finally:
        for ws in clients:
            ws.close()
