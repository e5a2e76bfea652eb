"""Graceful shutdown: stop(timeout), and run() on SIGINT/SIGTERM (docs/api.md#shutdown)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import warpsocket
from helpers import (
    LOGGING_PRELUDE,
    ServerProcess,
    ask,
    connect,
    expect_close,
    free_port,
    read_lines,
    tcp_connectable,
    wait_for,
    wait_no_warpsocket_threads,
    warpsocket_command,
    warpsocket_threads,
)
from websockets.exceptions import ConnectionClosed

SHUTDOWN_WORKER = (
    LOGGING_PRELUDE
    + """
import asyncio

async def handle_text_message(text, socket_id):
    if text == "sid?":
        warpsocket.send(socket_id, str(socket_id))
    elif text.startswith("slow "):
        seconds = float(text.split()[1])
        log("begin", socket_id)
        try:
            await asyncio.sleep(seconds)
        except BaseException as exc:
            log("cancelled", socket_id, type(exc).__name__)
            raise
        log("end", socket_id)
    elif text.startswith("note "):
        log("note", socket_id, text[5:])
    else:
        warpsocket.send(socket_id, text)

def handle_close(socket_id):
    log("close", socket_id)
"""
)


class Chatter(threading.Thread):
    """A client in the middle of a conversation: echo round trips until the server closes."""

    def __init__(self, ws):
        super().__init__(daemon=True)
        self.ws = ws
        self.round_trips = 0
        self.close_code = "not closed"
        self.error = None

    def run(self):
        try:
            i = 0
            while True:
                i += 1
                self.ws.send(f"echo {i}")
                reply = self.ws.recv(timeout=30)
                if reply != f"echo {i}":
                    raise AssertionError(f"unexpected reply {reply!r}")
                self.round_trips += 1
        except ConnectionClosed as exc:
            self.close_code = exc.rcvd.code if exc.rcvd is not None else None
        except BaseException as exc:  # reported to the test
            self.error = exc


def rebind(port):
    """The port can be bound and listened on again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


@pytest.mark.timeout(120)
def test_stop_lets_inflight_handlers_finish_and_closes_everyone_1001(start_server, log_path):
    server = start_server(SHUTDOWN_WORKER, threads=2, worker_arg=str(log_path), handler_timeout=30)
    port = server.port
    slow = [connect(server) for _ in range(4)]
    chatty = [connect(server) for _ in range(4)]
    chatters = []
    try:
        slow_sids = [int(ask(ws, "sid?")) for ws in slow]
        chatty_sids = [int(ask(ws, "sid?")) for ws in chatty]
        chatters = [Chatter(ws) for ws in chatty]
        for c in chatters:
            c.start()
        for ws in slow:
            ws.send("slow 1.0")
            ws.send("note queued")  # waits behind the slow handler when stop() begins
        wait_for(
            lambda: all(f"begin {sid}" in read_lines(log_path) for sid in slow_sids),
            message="every slow handler to begin",
        )
        wait_for(lambda: all(c.round_trips >= 3 for c in chatters), message="conversations under way")
        t0 = time.monotonic()
        server.stop(5)
        took = time.monotonic() - t0
        lines = read_lines(log_path)
        # the async handlers in flight completed rather than being cancelled
        for sid in slow_sids:
            assert f"end {sid}" in lines, lines
            assert f"cancelled {sid}" not in lines
        assert took < 5 + 3, f"stop(5) took {took:.1f}s"
        # every handle_close ran exactly once, after the connection's last handler
        for sid in slow_sids + chatty_sids:
            assert lines.count(f"close {sid}") == 1, (sid, lines)
        for sid in slow_sids:
            assert lines.index(f"end {sid}") < lines.index(f"close {sid}")
        # events already received behind them were handled too, before handle_close
        for sid in slow_sids:
            assert f"note {sid} queued" in lines, lines
            assert lines.index(f"end {sid}") < lines.index(f"note {sid} queued") < lines.index(f"close {sid}")
        # every client was told 1001
        for ws in slow:
            assert expect_close(ws)[0] == 1001
        for c in chatters:
            c.join(timeout=30)
            assert c.error is None, c.error
            assert c.close_code == 1001
        # threads joined, port free, nothing left in the engine
        wait_no_warpsocket_threads(timeout=2)
        assert warpsocket.stats()["connections"] == 0
        assert not tcp_connectable("127.0.0.1", port, timeout=1)
        rebind(port)
    finally:
        for ws in slow + chatty:
            ws.close()
        for c in chatters:
            c.join(timeout=10)
    # a new server takes the same port and works
    again = start_server(SHUTDOWN_WORKER, threads=1, worker_arg=str(log_path), bind=f"127.0.0.1:{port}")
    assert again.port == port
    with connect(again) as ws:
        assert ask(ws, "hello again") == "hello again"


@pytest.mark.timeout(120)
def test_stop_timeout_bounds_a_handler_that_awaits_too_long(start_server, log_path):
    server = start_server(SHUTDOWN_WORKER, threads=2, worker_arg=str(log_path), handler_timeout=120)
    port = server.port
    with connect(server) as stuck, connect(server) as idle:
        sid = int(ask(stuck, "sid?"))
        stuck.send("slow 30")
        wait_for(lambda: f"begin {sid}" in read_lines(log_path), message="the long handler to begin")
        t0 = time.monotonic()
        server.stop(timeout=1)
        took = time.monotonic() - t0
        assert took < 1 + 4, f"stop(timeout=1) took {took:.1f}s"
        assert expect_close(stuck)[0] == 1001
        assert expect_close(idle)[0] == 1001
    assert f"end {sid}" not in read_lines(log_path)
    wait_no_warpsocket_threads(timeout=5)
    assert not tcp_connectable("127.0.0.1", port, timeout=1)
    rebind(port)


def test_stop_with_no_connections_is_quick(start_server):
    server = start_server(threads=4)
    t0 = time.monotonic()
    server.stop(timeout=10)
    assert time.monotonic() - t0 < 3
    assert warpsocket_threads() == []


# ---------------------------------------------------------------- run() and signals

RUN_SCRIPT = """
import sys
import warpsocket

port, worker, log = sys.argv[1], sys.argv[2], sys.argv[3]
# optional: --handler-timeout S
options = {}
if len(sys.argv) > 5 and sys.argv[4] == "--handler-timeout":
    options["handler_timeout"] = float(sys.argv[5])
warpsocket.run(bind=f"127.0.0.1:{port}", worker=worker, threads=2, worker_arg=log, **options)
print("run returned", flush=True)
"""

CLI = "cli"
RUN = "run"


def server_process(how, worker, log_path, tmp_path, extra_args=()):
    """``warpsocket.run()`` (or the CLI) in a subprocess, on a free port."""
    port = free_port()
    if how == RUN:
        script = tmp_path / "run_server.py"
        script.write_text(RUN_SCRIPT)
        argv = [sys.executable, str(script), str(port), str(worker), str(log_path), *extra_args]
    else:
        argv = warpsocket_command(
            worker,
            "--bind",
            f"127.0.0.1:{port}",
            "--threads",
            "2",
            "--worker-arg",
            f'"{log_path}"',
            *extra_args,
        )
    return ServerProcess(argv, cwd=tmp_path, port=port)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("how", [RUN, CLI])
def test_signal_stops_run_gracefully(how, sig, write_worker, log_path, tmp_path):
    worker = write_worker(SHUTDOWN_WORKER)
    server = server_process(how, worker, log_path, tmp_path)
    clients = []
    chatters = []
    try:
        server.wait_listening()
        clients = [connect(f"ws://127.0.0.1:{server.port}/") for _ in range(3)]
        sids = [int(ask(ws, "sid?")) for ws in clients]
        clients[0].send("slow 1.0")
        wait_for(lambda: f"begin {sids[0]}" in read_lines(log_path), message="slow handler to begin")
        chatters = [Chatter(ws) for ws in clients[1:]]
        for c in chatters:
            c.start()
        wait_for(lambda: all(c.round_trips >= 2 for c in chatters), message="conversations under way")
        t0 = time.monotonic()
        server.proc.send_signal(sig)
        assert expect_close(clients[0], timeout=30)[0] == 1001
        for c in chatters:
            c.join(timeout=30)
            assert c.error is None, c.error
            assert c.close_code == 1001
        rc = server.proc.wait(timeout=30)
        took = time.monotonic() - t0
        output = server.output()
        assert rc == 0, f"exit code {rc}:\n{output}"
        assert took < 15, f"graceful exit took {took:.1f}s"
        if how == RUN:
            assert "run returned" in output, output
        lines = read_lines(log_path)
        assert f"end {sids[0]}" in lines, lines
        for sid in sids:
            assert lines.count(f"close {sid}") == 1, lines
        assert not tcp_connectable("127.0.0.1", server.port, timeout=1)
    finally:
        for ws in clients:
            ws.close()
        for c in chatters:
            c.join(timeout=10)
        server.kill()


SLOW_CLOSE_WORKER = (
    LOGGING_PRELUDE
    + """
import asyncio

def handle_text_message(text, socket_id):
    warpsocket.send(socket_id, text)

async def handle_close(socket_id):
    log("closing", socket_id)
    await asyncio.sleep(30)
    log("closed", socket_id)
"""
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", [RUN, CLI])
def test_second_signal_during_slow_shutdown_exits_at_once(how, write_worker, log_path, tmp_path):
    worker = write_worker(SLOW_CLOSE_WORKER)
    server = server_process(how, worker, log_path, tmp_path, extra_args=("--handler-timeout", "60"))
    ws = None
    try:
        server.wait_listening()
        ws = connect(f"ws://127.0.0.1:{server.port}/")
        assert ask(ws, "hi") == "hi"
        server.proc.send_signal(signal.SIGTERM)
        assert expect_close(ws, timeout=30)[0] == 1001
        # shutdown is now waiting for the slow handle_close
        wait_for(
            lambda: any(ln.startswith("closing ") for ln in read_lines(log_path)), message="slow handle_close"
        )
        time.sleep(0.3)
        assert server.proc.poll() is None, "the process did not wait for handle_close"
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        try:
            rc = server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"a second signal did not end the process:\n{server.output()}") from None
        took = time.monotonic() - t0
        assert took < 2.5, f"the process took {took:.1f}s to exit after the second signal"
        assert rc != 0, f"exit code {rc} after an interrupted shutdown:\n{server.output()}"
        assert not any(ln.startswith("closed ") for ln in read_lines(log_path))
    finally:
        if ws is not None:
            ws.close()
        server.kill()
