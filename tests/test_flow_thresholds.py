"""Incoming flow control at its exact thresholds (docs/api.md#limits).

A connection with 64 events waiting for its handlers is not read (and what was already
read is not decoded) until they are down to 32. The handler here waits, message by
message, for a gate the test opens in the kv store, so the test decides how many
events are outstanding; ``messages_in`` counts the events the reader queued.
"""

from __future__ import annotations

import time

import pytest
import warpsocket
from helpers import OP_TEXT, RawConn, build_frame, wait_for

PAUSE_AT = 64
RESUME_AT = 32

GATED_WORKER = """
import asyncio
import warpsocket

async def handle_text_message(text, socket_id):
    n = int(text)
    while int(warpsocket.get_key("flow-gate") or b"0") < n:
        await asyncio.sleep(0.002)
"""


def queued_since(before):
    return warpsocket.stats()["messages_in"] - before


def depth():
    return sum(w["queue_depth"] for w in warpsocket.stats()["workers"])


def settles_at(what, expected, still=0.5):
    """``what()`` reaches ``expected`` and is still there ``still`` seconds later."""
    wait_for(lambda: what() == expected, timeout=30, message=f"{expected} (now {what()})")
    time.sleep(still)  # a reader that resumed too early would have queued more by now
    assert what() == expected


@pytest.mark.timeout(120)
def test_reading_stops_at_64_waiting_events_and_resumes_at_32(start_server):
    server = start_server(GATED_WORKER, threads=1, handler_timeout=100.0)
    warpsocket.set_key("flow-gate", "0")
    before = warpsocket.stats()["messages_in"]
    try:
        with RawConn(server.port) as conn:
            conn.handshake()
            # 200 small messages in one burst: a few KiB, taken by one read.
            conn.sendall(b"".join(build_frame(OP_TEXT, str(n)) for n in range(1, 201)))
            # The first handler waits: 64 events are queued, no more.
            settles_at(lambda: queued_since(before), PAUSE_AT)
            assert depth() == PAUSE_AT
            # 31 handlers finish: 33 wait, still more than 32, so nothing is read.
            warpsocket.set_key("flow-gate", "31")
            settles_at(depth, PAUSE_AT - 31)
            assert queued_since(before) == PAUSE_AT
            # The 32nd: down to 32, the reader resumes and queues up to 64 again.
            warpsocket.set_key("flow-gate", "32")
            settles_at(lambda: queued_since(before), PAUSE_AT + 32)
            assert depth() == PAUSE_AT
            # Everything is handled in the end, nothing lost.
            warpsocket.set_key("flow-gate", "200")
            wait_for(lambda: queued_since(before) == 200 and depth() == 0, timeout=30, message="all handled")
    finally:
        warpsocket.set_key("flow-gate")
