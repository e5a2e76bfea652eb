"""warpsocket.stats()."""

from __future__ import annotations

import warpsocket
from helpers import ECHO_WORKER, ask, connect, wait_for

INT_KEYS = [
    "connections",
    "virtual_sockets",
    "channels",
    "subscriptions",
    "keys",
    "messages_in",
    "messages_out",
    "bytes_in",
    "bytes_out",
    "backpressure_closes",
]


def test_stats_keys_and_types(start_server):
    start_server(ECHO_WORKER, threads=2)
    stats = warpsocket.stats()
    assert isinstance(stats, dict)
    for key in INT_KEYS:
        assert key in stats, key
        assert isinstance(stats[key], int), key
        assert stats[key] >= 0, key
    assert isinstance(stats["workers"], list)


def test_stats_connections_and_workers(start_server):
    threads = 3
    server = start_server(ECHO_WORKER, threads=threads)
    wait_for(
        lambda: warpsocket.stats()["connections"] == 0,
        message="no connections at start",
    )
    clients = [connect(server) for _ in range(5)]
    try:
        for ws in clients:
            assert ask(ws, "x") == "x"
        wait_for(lambda: warpsocket.stats()["connections"] == 5, message="5 connections")
        stats = warpsocket.stats()
        workers = stats["workers"]
        assert len(workers) == threads
        for w in workers:
            assert isinstance(w, dict)
            for key in ("id", "connections", "queue_depth"):
                assert key in w
                assert isinstance(w[key], int)
            assert w["queue_depth"] >= 0
        assert len({w["id"] for w in workers}) == threads
        assert sum(w["connections"] for w in workers) == 5
        assert sorted(w["connections"] for w in workers) == [1, 2, 2]  # round-robin
        for ws in clients[:2]:
            ws.close()
        wait_for(
            lambda: warpsocket.stats()["connections"] == 3,
            message="3 connections after closing 2",
        )
    finally:
        for ws in clients:
            ws.close()
    wait_for(lambda: warpsocket.stats()["connections"] == 0, message="0 connections")
    # The per-worker count drops a moment after the global one (last step of the cleanup).
    wait_for(
        lambda: sum(w["connections"] for w in warpsocket.stats()["workers"]) == 0,
        message="0 connections per worker",
    )


def test_stats_message_and_byte_counters_grow(start_server):
    server = start_server(ECHO_WORKER, threads=2)
    with connect(server) as ws:
        assert ask(ws, "warmup") == "warmup"
        wait_for(
            lambda: warpsocket.stats()["messages_out"] >= 1,
            message="messages_out counted",
        )
        before = warpsocket.stats()
        for _ in range(3):
            assert ask(ws, "0123456789") == "0123456789"
        assert ask(ws, b"\x00" * 100) == b"\x00" * 100

        def grown():
            now = warpsocket.stats()
            return (
                now["messages_in"] >= before["messages_in"] + 4
                and now["bytes_in"] >= before["bytes_in"] + 130
                and now["messages_out"] >= before["messages_out"] + 4
                and now["bytes_out"] >= before["bytes_out"] + 130
            )

        wait_for(grown, message="counters to grow")


def test_stats_queue_depth_counts_pending_events(start_server):
    source = """
    import asyncio
    import warpsocket

    EVENT = None

    async def handle_text_message(text, socket_id):
        global EVENT
        if EVENT is None:
            EVENT = asyncio.Event()
        if text == "block":
            await asyncio.wait_for(EVENT.wait(), 60)
        elif text == "release":
            EVENT.set()
        warpsocket.send(socket_id, text)
    """
    server = start_server(source, threads=1, handler_timeout=120)
    with connect(server) as blocked, connect(server) as releaser:
        blocked.send("block")
        for i in range(3):
            blocked.send(f"queued-{i}")
        wait_for(
            lambda: warpsocket.stats()["workers"][0]["queue_depth"] >= 3,
            message="queue_depth to count the pending events",
        )
        assert ask(releaser, "release") == "release"
        got = [blocked.recv(timeout=30) for _ in range(4)]
        assert got == ["block", "queued-0", "queued-1", "queued-2"]
        wait_for(
            lambda: warpsocket.stats()["workers"][0]["queue_depth"] == 0,
            message="queue to drain",
        )


def test_stats_without_server():
    stats = warpsocket.stats()
    assert stats["connections"] == 0
    for key in INT_KEYS:
        assert key in stats


ID_WORKER = """
import warpsocket

def handle_text_message(text, socket_id):
    warpsocket.send(socket_id, str(socket_id))
"""


def test_bytes_out_counts_a_virtual_sockets_prefix(start_server):
    """docs/api.md#stats: bytes_out counts payload bytes as delivered, a virtual socket's prefix included."""
    server = start_server(ID_WORKER, threads=1)
    with connect(server) as ws:
        sid = int(ask(ws, "id"))
        virtual = warpsocket.create_virtual_socket(sid, "pre:")
        warpsocket.subscribe([sid, virtual], "prefix-room")
        before = warpsocket.stats()["bytes_out"]
        assert warpsocket.send(virtual, "hello") == 1
        assert ws.recv(timeout=20) == "pre:hello"
        assert warpsocket.stats()["bytes_out"] - before == len("pre:hello")
        # A channel send: one plain copy, one prefixed.
        assert warpsocket.send("prefix-room", b"xy") == 2
        assert sorted([ws.recv(timeout=20), ws.recv(timeout=20)]) == [b"pre:xy", b"xy"]
        assert warpsocket.stats()["bytes_out"] - before == len("pre:hello") + len("pre:xy") + len("xy")
