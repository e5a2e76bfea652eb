"""Hung workers: blocked in a C call, the logged stack, and the other workers meanwhile.

(The ``while True`` busy loop case is in test_handlers.py.)
"""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path

import pytest
import warpsocket
from helpers import LOGGING_PRELUDE, ask, connect, expect_close, read_lines, wait_for
from websockets.exceptions import ConnectionClosed

HUNG_WORKER = (
    LOGGING_PRELUDE
    + """
import time

def handle_start(worker_arg):
    global LOG
    LOG = worker_arg
    log("start", threading.get_ident())

def spin_until_released():
    while not os.path.exists(LOG + ".release"):  # SPIN-LINE
        pass

def spin(socket_id):
    # The loop is in a function of its own: on CPython 3.13 an exception set with
    # PyThreadState_SetAsyncExc can skip the except clauses of the frame it is raised in
    # (python/cpython#139622); the caller's see it.
    log("spinning", socket_id, threading.get_ident())
    try:
        spin_until_released()
        log("released", socket_id)
    except BaseException as exc:
        log("interrupted", socket_id, type(exc).__name__)
        raise

def block_in_sleep(socket_id, seconds):
    log("sleeping", socket_id, threading.get_ident())
    try:
        time.sleep(seconds)  # SLEEP-LINE
        log("woke", socket_id)
    except BaseException as exc:
        log("interrupted", socket_id, type(exc).__name__)
        raise

def handle_text_message(text, socket_id):
    if text == "who":
        warpsocket.send(socket_id, str(threading.get_ident()))
    elif text == "sub":
        warpsocket.subscribe(socket_id, "news")
        warpsocket.send(socket_id, "subscribed")
    elif text == "spin":
        spin(socket_id)
    elif text.startswith("sleep "):
        block_in_sleep(socket_id, float(text.split()[1]))
    else:
        warpsocket.send(socket_id, text)

def handle_close(socket_id):
    log("close", socket_id, threading.get_ident())
"""
)


@pytest.fixture
def release(log_path):
    """Creating the release file ends a spinning handler that was not interrupted."""
    path = Path(str(log_path) + ".release")
    try:
        yield path
    finally:
        path.touch()


def lines_starting(log_path, word):
    return [line.split() for line in read_lines(log_path) if line.startswith(word + " ")]


def start_tids(log_path):
    return [int(parts[1]) for parts in lines_starting(log_path, "start")]


def line_number(source_path, marker):
    for number, line in enumerate(Path(source_path).read_text().splitlines(), start=1):
        if marker in line:
            return number
    raise AssertionError(f"{marker} not found")


def thread_alive(ident):
    return any(t.ident == ident and t.is_alive() for t in threading.enumerate())


def pinned_clients(server, count):
    """``count`` clients with the worker thread id that serves each."""
    clients = [connect(server) for _ in range(count)]
    return clients, [int(ask(ws, "who")) for ws in clients]


@pytest.mark.timeout(120)
def test_worker_blocked_in_sleep_is_retired_and_replaced_while_blocked(start_server, log_path):
    server = start_server(HUNG_WORKER, threads=2, worker_arg=str(log_path), hang_timeout=1.0)
    old_tids = set(start_tids(log_path))
    assert len(old_tids) == 2
    clients, tids = pinned_clients(server, 4)
    newcomers = []
    try:
        a, b, c, d = clients
        tid_a, tid_b, tid_c, tid_d = tids
        assert tid_a == tid_c != tid_b == tid_d
        a.send("sleep 12")
        wait_for(lambda: lines_starting(log_path, "sleeping"), message="handler to block")
        t0 = time.monotonic()
        c.send("waiting behind the sleeper")
        # both connections of the blocked worker are closed with 1011 long before the sleep ends
        assert expect_close(a, timeout=30)[0] == 1011
        assert expect_close(c, timeout=30)[0] == 1011
        closed_after = time.monotonic() - t0
        assert closed_after < 6, f"connections of the blocked worker closed after {closed_after:.1f}s"
        # a replacement ran handle_start; the pool is back to two live workers
        wait_for(lambda: len(start_tids(log_path)) == 3, timeout=10, message="replacement worker")
        new_tid = next(t for t in start_tids(log_path) if t not in old_tids)
        wait_for(lambda: len(warpsocket.stats()["workers"]) == 2, timeout=10, message="two live workers")
        # handle_close of the retired worker's connections runs on the replacement
        wait_for(
            lambda: len([p for p in lines_starting(log_path, "close") if int(p[2]) == new_tid]) == 2,
            timeout=10,
            message="handle_close of the blocked worker's connections on the replacement",
        )
        # new connections are served by live workers only, the other worker never stopped
        for _ in range(4):
            ws = connect(server)
            newcomers.append(ws)
            assert int(ask(ws, "who", timeout=10)) in (tid_b, new_tid)
        assert ask(b, "still") == "still"
        assert ask(d, "still") == "still"
        # ... all of that while the old thread was still inside time.sleep
        assert time.monotonic() - t0 < 11, "the checks above took too long to prove anything"
        assert thread_alive(tid_a), "the blocked thread ended before its sleep was over"
        assert not lines_starting(log_path, "woke") and not lines_starting(log_path, "interrupted")
        # once the sleep returns, WorkerRetired is raised in the old thread, which then ends
        wait_for(lambda: lines_starting(log_path, "interrupted"), timeout=30, message="WorkerRetired raised")
        assert lines_starting(log_path, "interrupted")[0][2] == "WorkerRetired"
        assert not lines_starting(log_path, "woke")
        wait_for(lambda: not thread_alive(tid_a), timeout=10, message="the retired thread to end")
        assert len(warpsocket.stats()["workers"]) == 2
        served = {int(ask(ws, "who")) for ws in newcomers}
        assert served == {tid_b, new_tid}
    finally:
        for ws in clients + newcomers:
            ws.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["spin", "sleep"])
def test_retirement_log_shows_where_the_thread_hangs(
    start_server, write_worker, log_path, warpsocket_log, release, how
):
    worker_path = write_worker(HUNG_WORKER)
    server = start_server(worker=str(worker_path), threads=2, worker_arg=str(log_path), hang_timeout=1.0)
    if how == "spin":
        marker, function, command = "# SPIN-LINE", "spin_until_released", "spin"
    else:
        marker, function, command = "# SLEEP-LINE", "block_in_sleep", "sleep 6"
    expected = f'File "{worker_path}", line {line_number(worker_path, marker)}, in {function}'
    with connect(server) as hung, connect(server) as other:
        hung.send(command)
        assert expect_close(hung, timeout=30)[0] == 1011
        assert ask(other, "fine") == "fine"
    wait_for(
        lambda: [text for text in warpsocket_log.errors() if expected in text],
        timeout=10,
        message=f"an ERROR record on logger warpsocket containing {expected!r}",
    )
    text = next(text for text in warpsocket_log.errors() if expected in text)
    # the hanging source line itself is shown too
    assert marker in text
    assert "handle_text_message" in text
    release.touch()
    wait_for(
        lambda: lines_starting(log_path, "interrupted") or lines_starting(log_path, "released"), timeout=30
    )


class NewsReader(threading.Thread):
    """Records the sequence numbers of "news" broadcasts (8-byte big-endian) and when they came."""

    def __init__(self, ws):
        super().__init__(daemon=True)
        self.ws = ws
        self.seqs = []
        self.times = []
        self.closed_with = "open"
        self.error = None

    def run(self):
        try:
            while True:
                msg = self.ws.recv(timeout=60)
                if msg == "done":
                    return
                self.seqs.append(struct.unpack("!Q", msg)[0])
                self.times.append(time.monotonic())
        except ConnectionClosed as exc:
            self.closed_with = exc.rcvd.code if exc.rcvd is not None else None
        except BaseException as exc:  # reported to the test
            self.error = exc


@pytest.mark.timeout(120)
def test_other_workers_keep_receiving_broadcasts_during_a_hang(start_server, log_path, release):
    server = start_server(HUNG_WORKER, threads=2, worker_arg=str(log_path), hang_timeout=1.0)
    clients, tids = pinned_clients(server, 6)
    hung_tid = tids[0]
    hung_side = [ws for ws, t in zip(clients, tids, strict=True) if t == hung_tid]
    healthy = [ws for ws, t in zip(clients, tids, strict=True) if t != hung_tid]
    assert len(hung_side) == 3 and len(healthy) == 3
    readers = []
    newcomers = []
    try:
        for ws in clients:
            assert ask(ws, "sub") == "subscribed"
        readers = [NewsReader(ws) for ws in healthy]
        for r in readers:
            r.start()
        hung_side[0].send("spin")
        wait_for(lambda: lines_starting(log_path, "spinning"), message="handler to spin")
        t_hang = time.monotonic()
        sent_at = []
        retired_at = None
        seq = 0
        # broadcast from this thread every 20 ms: through the hang, the retirement and after
        while time.monotonic() - t_hang < 5.0 or retired_at is None:
            sent_at.append(time.monotonic())
            warpsocket.send("news", struct.pack("!Q", seq))
            seq += 1
            if retired_at is None and len(start_tids(log_path)) == 3:
                retired_at = time.monotonic()
            assert time.monotonic() - t_hang < 30, "the hung worker was never replaced"
            time.sleep(0.02)
        for ws in healthy:
            ws.send("done")  # echoed back: ends the reader
        for r in readers:
            r.join(timeout=30)
            assert r.error is None, r.error
            assert r.closed_with == "open", f"a healthy client was closed with {r.closed_with}"
            # every broadcast, in order, each promptly
            assert r.seqs == list(range(seq)), (
                f"missing broadcasts: {sorted(set(range(seq)) - set(r.seqs))[:10]}"
            )
            latencies = [got - sent_at[s] for s, got in zip(r.seqs, r.times, strict=True)]
            assert max(latencies) < 2.0, f"a broadcast took {max(latencies):.2f}s during the hang"
        # the hung worker's clients were closed with 1011 (also those that sent nothing)
        for ws in hung_side:
            assert expect_close(ws, timeout=30)[0] == 1011
        # new connections are served while the old thread still spins (release file not there yet)
        assert not lines_starting(log_path, "released")
        new_tid = next(t for t in start_tids(log_path) if t not in tids)
        for _ in range(4):
            ws = connect(server)
            newcomers.append(ws)
            assert int(ask(ws, "who", timeout=10)) in (new_tid, *[t for t in tids if t != hung_tid])
            assert ask(ws, "sub", timeout=10) == "subscribed"
        assert warpsocket.send("news", "after") == len(newcomers) + len(healthy)
        for ws in newcomers + healthy:
            assert ws.recv(timeout=10) == "after"
    finally:
        release.touch()
        for ws in clients + newcomers:
            ws.close()
        for r in readers:
            r.join(timeout=10)


SLOW_ECHO_WORKER = """
import time
import warpsocket

def handle_text_message(text, socket_id):
    time.sleep(0.05)
    warpsocket.send(socket_id, text)
"""


@pytest.mark.timeout(120)
def test_a_batch_of_slow_handlers_outlasting_hang_timeout_is_not_a_hang(start_server):
    """Busy is not hung: 60 events of 50 ms each are one 3 s drain, three hang_timeouts.

    The worker takes up an event every 50 ms throughout, so it is never retired and
    every message is answered in order.
    """
    server = start_server(SLOW_ECHO_WORKER, threads=1, hang_timeout=1.0)
    retired_before = warpsocket.stats()["worker_retirements"]
    with connect(server) as ws:
        sent = [f"m{i}" for i in range(60)]
        for text in sent:
            ws.send(text)
        assert [ws.recv(timeout=60) for _ in sent] == sent
        assert ask(ws, "still here") == "still here"
    assert warpsocket.stats()["worker_retirements"] == retired_before
