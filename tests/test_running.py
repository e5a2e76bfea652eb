"""Running a server: start/stop, bind, threads, worker_arg, worker lookup, errors, shutdown."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time

import pytest
import warpsocket
from helpers import (
    ECHO_WORKER,
    LOGGING_PRELUDE,
    ask,
    can_bind_ipv6_loopback,
    connect,
    expect_close,
    read_lines,
    tcp_connectable,
    wait_for,
    wait_no_warpsocket_threads,
    warpsocket_threads,
    ws_url,
)
from websockets.exceptions import ConnectionClosed


def assert_port_bindable(port, host="127.0.0.1"):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen()


def echo_roundtrip(server_or_url):
    with connect(server_or_url) as ws:
        assert ask(ws, "hello") == "hello"


def thread_snapshot():
    return set(threading.enumerate())


def wait_threads_back_to(before, timeout=20.0):
    wait_for(
        lambda: not [t for t in thread_snapshot() - before if t.is_alive()],
        timeout=timeout,
        message=f"threads to go back to the baseline (extra: {[t.name for t in thread_snapshot() - before]})",
    )


# ---------------------------------------------------------------- start / stop


def test_start_returns_server_with_addresses_and_port(start_server):
    server = start_server(ECHO_WORKER)
    assert isinstance(server.port, int)
    assert server.port > 0
    assert len(server.addresses) == 1
    host, port = server.addresses[0]
    assert host == "127.0.0.1"
    assert port == server.port
    assert warpsocket_threads(), "expected running worker threads named warpsocket-*"
    echo_roundtrip(server)


def test_stop_leaves_no_threads_and_frees_port(write_worker):
    before = thread_snapshot()
    server = warpsocket.start(bind="127.0.0.1:0", worker=str(write_worker(ECHO_WORKER)), threads=2)
    try:
        port = server.port
        ws = connect(server)
        assert ask(ws, "x") == "x"
    finally:
        server.stop(timeout=10)
    try:
        code, _ = expect_close(ws)
        assert code == 1001
    finally:
        ws.close()
    wait_no_warpsocket_threads()
    assert not warpsocket_threads()
    wait_threads_back_to(before)
    assert not tcp_connectable("127.0.0.1", port, timeout=2)
    assert_port_bindable(port)


def test_context_manager_stops_server(write_worker):
    with warpsocket.start(bind="127.0.0.1:0", worker=str(write_worker(ECHO_WORKER)), threads=2) as server:
        port = server.port
        echo_roundtrip(server)
        assert warpsocket_threads()
    wait_no_warpsocket_threads()
    assert not tcp_connectable("127.0.0.1", port, timeout=2)
    assert warpsocket.stats()["connections"] == 0
    # a new server can be started right away
    with warpsocket.start(bind="127.0.0.1:0", worker=str(write_worker(ECHO_WORKER)), threads=1) as server:
        echo_roundtrip(server)
    wait_no_warpsocket_threads()


def test_context_manager_stops_server_on_exception(write_worker):
    worker = str(write_worker(ECHO_WORKER))
    with (
        pytest.raises(ZeroDivisionError),
        warpsocket.start(bind="127.0.0.1:0", worker=worker, threads=2) as server,
    ):
        echo_roundtrip(server)
        1 / 0  # noqa: B018
    wait_no_warpsocket_threads()


def test_wait_blocks_until_stopped(start_server):
    server = start_server(ECHO_WORKER)
    returned = threading.Event()

    def waiter():
        server.wait()
        returned.set()

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    assert not returned.wait(0.5), "wait() returned while the server is still running"
    echo_roundtrip(server)
    assert not returned.is_set()
    server.stop(timeout=10)
    assert returned.wait(20), "wait() did not return after stop()"
    t.join(5)
    # wait() on a stopped server returns immediately
    server.wait()


def test_start_while_running_raises_runtime_error(start_server, write_worker):
    server = start_server(ECHO_WORKER)
    with pytest.raises(RuntimeError):
        warpsocket.start(bind="127.0.0.1:0", worker=str(write_worker(ECHO_WORKER)), threads=1)
    # the running server is unaffected
    echo_roundtrip(server)
    assert len(warpsocket.stats()["workers"]) == 2


def test_start_after_stop_begins_with_no_connections(start_server):
    server = start_server(ECHO_WORKER)
    clients = [connect(server) for _ in range(3)]
    old_ids = set()
    try:
        for ws in clients:
            old_ids.add(int(ask(ws, "sid?")))
        wait_for(lambda: warpsocket.stats()["connections"] == 3, message="3 connections")
        server.stop(timeout=10)
        for ws in clients:
            assert expect_close(ws)[0] == 1001
    finally:
        for ws in clients:
            ws.close()
    wait_no_warpsocket_threads()
    assert warpsocket.stats()["connections"] == 0

    server2 = start_server(ECHO_WORKER, threads=3)
    assert warpsocket.stats()["connections"] == 0
    assert len(warpsocket.stats()["workers"]) == 3
    with connect(server2) as ws:
        new_id = int(ask(ws, "sid?"))
        assert ask(ws, "again") == "again"
    assert new_id not in old_ids, "socket ids must never be reused within a process"
    for sid in old_ids:
        assert warpsocket.send(sid, "stale") == 0


# ---------------------------------------------------------------- bind


def test_bind_list_ipv4_and_ipv6(start_server):
    binds = ["127.0.0.1:0"]
    ipv6 = can_bind_ipv6_loopback()
    if ipv6:
        binds.append("[::1]:0")
    server = start_server(ECHO_WORKER, bind=binds)
    assert len(server.addresses) == len(binds)
    host4, port4 = server.addresses[0]
    assert host4 == "127.0.0.1"
    assert server.port == port4
    echo_roundtrip(ws_url(server, host="127.0.0.1", port=port4))
    if not ipv6:
        pytest.skip("::1 cannot be bound on this machine; IPv4 part passed")
    host6, port6 = server.addresses[1]
    assert host6.strip("[]") == "::1"
    assert port6 > 0
    echo_roundtrip(ws_url(server, host="::1", port=port6))


def test_bind_list_two_ipv4_ports(start_server):
    server = start_server(ECHO_WORKER, bind=["127.0.0.1:0", "127.0.0.1:0"])
    assert len(server.addresses) == 2
    ports = [p for _, p in server.addresses]
    assert ports[0] != ports[1]
    for port in ports:
        echo_roundtrip(ws_url(server, port=port))


# ---------------------------------------------------------------- threads / worker_arg / worker lookup


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_respected(start_server, threads):
    start_server(ECHO_WORKER, threads=threads)
    stats = warpsocket.stats()
    assert len(stats["workers"]) == threads
    for w in stats["workers"]:
        assert {"id", "connections", "queue_depth"} <= set(w)
    assert len({w["id"] for w in stats["workers"]}) == threads


def test_worker_arg_reaches_handle_start_in_every_worker(start_server, tmp_path):
    out = tmp_path / "starts.log"
    source = """
    import json, threading
    ARG = None

    def handle_start(worker_arg):
        global ARG
        ARG = worker_arg
        with open(worker_arg["out"], "a") as f:
            f.write(json.dumps({"tid": threading.get_ident(), "value": worker_arg["value"]}) + "\\n")

    def handle_text_message(text, socket_id):
        import warpsocket
        warpsocket.send(socket_id, json.dumps(ARG["value"]))
    """
    value = {"name": "warp", "numbers": [1, 2, 3], "nested": {"ok": True}}
    start_server(source, threads=3, worker_arg={"out": str(out), "value": value})
    # start() returns only once every worker has finished handle_start
    lines = [json.loads(line) for line in read_lines(out)]
    assert len(lines) == 3
    assert all(entry["value"] == value for entry in lines)
    assert len({entry["tid"] for entry in lines}) == 3


def test_worker_arg_visible_to_handlers(start_server):
    source = """
    import json
    import warpsocket
    ARG = "unset"

    def handle_start(worker_arg):
        global ARG
        ARG = worker_arg

    def handle_text_message(text, socket_id):
        warpsocket.send(socket_id, json.dumps(ARG))
    """
    server = start_server(source, threads=2, worker_arg=["a", 1, None])
    for _ in range(4):  # round-robin: both workers are asked
        with connect(server) as ws:
            assert json.loads(ask(ws, "arg?")) == ["a", 1, None]


def test_worker_arg_defaults_to_none(start_server):
    source = """
    import warpsocket
    ARG = "unset"

    def handle_start(worker_arg):
        global ARG
        ARG = worker_arg

    def handle_text_message(text, socket_id):
        warpsocket.send(socket_id, repr(ARG))
    """
    server = start_server(source, threads=1)
    with connect(server) as ws:
        assert ask(ws, "arg?") == "None"


def test_worker_as_module_name(start_server, tmp_path, monkeypatch):
    (tmp_path / "ws_modname_worker.py").write_text(ECHO_WORKER)
    monkeypatch.syspath_prepend(str(tmp_path))
    server = start_server(worker="ws_modname_worker", threads=2)
    echo_roundtrip(server)


def test_worker_as_dotted_module_name(start_server, tmp_path, monkeypatch):
    pkg = tmp_path / "wsapp_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ws_worker.py").write_text(ECHO_WORKER)
    monkeypatch.syspath_prepend(str(tmp_path))
    server = start_server(worker="wsapp_pkg.ws_worker", threads=2)
    echo_roundtrip(server)


class _SlowContainsList(list):
    """A ``sys.path`` whose membership test takes a while, to widen check-then-insert races."""

    def __contains__(self, item):
        found = super().__contains__(item)
        time.sleep(0.02)
        return found


def test_worker_folder_goes_on_sys_path_once_when_workers_load_together(write_worker, monkeypatch):
    # Every worker thread loads the module at the same time (in parallel without the
    # GIL): its folder must still be added to sys.path once, not once per worker.
    worker = write_worker(ECHO_WORKER)
    folder = str(worker.parent)
    monkeypatch.setattr("sys.path", _SlowContainsList(p for p in sys.path if p != folder))
    with warpsocket.start("127.0.0.1:0", str(worker), threads=8) as server:
        echo_roundtrip(server)
        assert sys.path.count(folder) == 1, sys.path[:10]


# ---------------------------------------------------------------- start errors


def assert_start_fails_cleanly(before):
    wait_threads_back_to(before)
    assert not warpsocket_threads()


def test_start_error_busy_port(write_worker):
    before = thread_snapshot()
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        addr = f"127.0.0.1:{port}"
        with pytest.raises(OSError) as info:
            warpsocket.start(bind=addr, worker=str(write_worker(ECHO_WORKER)), threads=2)
        assert addr in str(info.value)
        assert_start_fails_cleanly(before)
    finally:
        busy.close()
    # start() works afterwards
    with warpsocket.start(bind="127.0.0.1:0", worker=str(write_worker(ECHO_WORKER)), threads=2) as server:
        echo_roundtrip(server)
    wait_no_warpsocket_threads()


def test_start_error_busy_second_address_releases_first(write_worker):
    before = thread_snapshot()
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_addr = f"127.0.0.1:{busy.getsockname()[1]}"
        free = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        free.bind(("127.0.0.1", 0))
        free_port_ = free.getsockname()[1]
        free.close()
        with pytest.raises(OSError) as info:
            warpsocket.start(
                bind=[f"127.0.0.1:{free_port_}", busy_addr],
                worker=str(write_worker(ECHO_WORKER)),
                threads=2,
            )
        assert busy_addr in str(info.value)
        assert_start_fails_cleanly(before)
        # the first address must not stay bound
        assert not tcp_connectable("127.0.0.1", free_port_, timeout=2)
    finally:
        busy.close()
    with warpsocket.start(bind="127.0.0.1:0", worker=str(write_worker(ECHO_WORKER)), threads=1) as server:
        echo_roundtrip(server)
    wait_no_warpsocket_threads()


@pytest.mark.parametrize("kind", ["missing_file", "syntax_error", "missing_module", "import_error_inside"])
def test_start_error_worker_cannot_be_imported(write_worker, tmp_path, kind):
    before = thread_snapshot()
    if kind == "missing_file":
        worker = str(tmp_path / "no_such_worker_file.py")
        needle = "no_such_worker_file"
    elif kind == "syntax_error":
        worker = str(
            write_worker(
                "def handle_text_message(text, socket_id)\n    pass\n",
                name="broken_syntax_worker",
            )
        )
        needle = "broken_syntax_worker"
    elif kind == "missing_module":
        worker = "no_such_module_for_warpsocket_tests"
        needle = worker
    else:
        worker = str(write_worker("import module_that_does_not_exist_xyz\n", name="bad_import_worker"))
        needle = "bad_import_worker"
    with pytest.raises(ImportError) as info:
        warpsocket.start(bind="127.0.0.1:0", worker=worker, threads=2)
    assert needle in str(info.value)
    assert_start_fails_cleanly(before)
    with warpsocket.start(bind="127.0.0.1:0", worker=str(write_worker(ECHO_WORKER)), threads=2) as server:
        echo_roundtrip(server)
    wait_no_warpsocket_threads()


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_start_error_handle_start_raises(write_worker, is_async):
    before = thread_snapshot()
    source = f"""
    import asyncio

    {"async " if is_async else ""}def handle_start(worker_arg):
        {"await asyncio.sleep(0)" if is_async else "pass"}
        raise ValueError("handle_start exploded: code 7731")
    """
    with pytest.raises(RuntimeError) as info:
        warpsocket.start(bind="127.0.0.1:0", worker=str(write_worker(source)), threads=2)
    msg = str(info.value)
    assert "handle_start" in msg
    assert "code 7731" in msg
    assert isinstance(info.value.__cause__, ValueError)
    assert "code 7731" in str(info.value.__cause__)
    assert_start_fails_cleanly(before)
    with warpsocket.start(bind="127.0.0.1:0", worker=str(write_worker(ECHO_WORKER)), threads=2) as server:
        echo_roundtrip(server)
    wait_no_warpsocket_threads()


def test_start_error_port_released_after_handle_start_failure(write_worker):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    source = """
    def handle_start(worker_arg):
        raise KeyError("nope")
    """
    with pytest.raises(RuntimeError):
        warpsocket.start(bind=f"127.0.0.1:{port}", worker=str(write_worker(source)), threads=2)
    wait_no_warpsocket_threads()
    assert not tcp_connectable("127.0.0.1", port, timeout=2)
    with warpsocket.start(
        bind=f"127.0.0.1:{port}", worker=str(write_worker(ECHO_WORKER)), threads=1
    ) as server:
        assert server.port == port
        echo_roundtrip(server)
    wait_no_warpsocket_threads()


def test_start_waits_for_slow_handle_start(start_server, tmp_path):
    out = tmp_path / "slow.log"
    source = """
    import time

    def handle_start(worker_arg):
        time.sleep(0.5)
        with open(worker_arg, "a") as f:
            f.write("started\\n")
    """
    t0 = time.monotonic()
    start_server(source, threads=2, worker_arg=str(out))
    assert time.monotonic() - t0 >= 0.5
    assert read_lines(out) == ["started", "started"]


# ---------------------------------------------------------------- shutdown


def test_stop_closes_with_1001_and_runs_pending_handlers_and_handle_close(start_server, log_path):
    source = (
        LOGGING_PRELUDE
        + """
import asyncio

def handle_open(socket_id, ip, headers):
    log("open", socket_id)
    return True

async def handle_text_message(text, socket_id):
    if text == "sid?":
        warpsocket.send(socket_id, str(socket_id))
        return
    log("begin", socket_id, text)
    await asyncio.sleep(1.0)
    log("end", socket_id, text)

def handle_close(socket_id):
    log("close", socket_id)
"""
    )
    server = start_server(source, threads=2, worker_arg=str(log_path), handler_timeout=30)
    clients = [connect(server) for _ in range(3)]
    try:
        sids = [int(ask(ws, "sid?")) for ws in clients]
        clients[0].send("slow")
        wait_for(
            lambda: f"begin {sids[0]} slow" in read_lines(log_path),
            message="slow handler to begin",
        )
        server.stop(timeout=20)
        lines = read_lines(log_path)
        # the handler that was already running finished, every handle_close ran exactly once
        assert f"end {sids[0]} slow" in lines
        for sid in sids:
            assert lines.count(f"close {sid}") == 1, lines
        for ws in clients:
            code, _ = expect_close(ws)
            assert code == 1001
    finally:
        for ws in clients:
            ws.close()
    wait_no_warpsocket_threads()
    assert warpsocket.stats()["connections"] == 0


def test_stop_is_idempotent(write_worker):
    server = warpsocket.start(bind="127.0.0.1:0", worker=str(write_worker(ECHO_WORKER)), threads=1)
    server.stop(timeout=10)
    server.stop(timeout=10)
    wait_no_warpsocket_threads()


def test_new_connections_refused_after_stop(write_worker):
    server = warpsocket.start(bind="127.0.0.1:0", worker=str(write_worker(ECHO_WORKER)), threads=1)
    port = server.port
    server.stop(timeout=10)
    with (
        pytest.raises((OSError, ConnectionClosed)),
        contextlib.closing(connect(ws_url(server, port=port), open_timeout=5)),
    ):
        pass
