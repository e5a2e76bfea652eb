"""Incoming flow control: a client that sends faster than its handlers finish is slowed by TCP.

The server stops reading a connection whose handlers fall behind, so memory stays
bounded and nothing is dropped or reordered. The server runs in the test process:
the test process's RSS is the server's memory.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import warpsocket
from helpers import async_connect_kwargs, ws_url
from websockets.asyncio.client import connect as async_connect

MIB = 1024 * 1024

# Every message is "<seq> <padding>" (about 1 KiB). The handler checks the order itself,
# yields to the loop for each message and sleeps a little every 100 messages, so it is
# clearly slower than the client. Progress goes to the kv store for the test to watch.
FLOOD_WORKER = """
import asyncio
import warpsocket

NEXT = {}
BAD = {}

async def handle_text_message(text, socket_id):
    if text == "sid?":
        warpsocket.send(socket_id, str(socket_id))
        return
    if text == "report":
        warpsocket.send(socket_id, f"{NEXT.get(socket_id, 0)} {BAD.get(socket_id, 0)}")
        return
    seq = int(text.split(" ", 1)[0])
    await asyncio.sleep(0)
    expected = NEXT.get(socket_id, 0)
    if seq != expected:
        BAD[socket_id] = BAD.get(socket_id, 0) + 1
    NEXT[socket_id] = seq + 1
    if seq % 100 == 99:
        await asyncio.sleep(0.01)
    if seq % 500 == 499:
        warpsocket.set_key(f"flood:{socket_id}", str(seq + 1))
"""


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class Monitor(threading.Thread):
    """Samples the server's RSS and the workers' queue depth while the flood runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.rss_peak = rss_bytes()
        self.depth_peak = 0

    def run(self):
        while not self.stop.wait(0.05):
            self.rss_peak = max(self.rss_peak, rss_bytes())
            depth = sum(w["queue_depth"] for w in warpsocket.stats()["workers"])
            self.depth_peak = max(self.depth_peak, depth)


def handled_so_far(sid):
    value = warpsocket.get_key(f"flood:{sid}")
    return int(value) if value else 0


@pytest.mark.timeout(180)
def test_flooding_client_is_slowed_nothing_lost_memory_bounded(start_server):
    server = start_server(FLOOD_WORKER, threads=1, handler_timeout=30.0, hang_timeout=10.0)
    count = 100_000
    padding = "x" * 1000
    result = {}

    async def flood():
        async with async_connect(ws_url(server), **async_connect_kwargs(write_limit=64 * 1024)) as ws:
            await ws.send("sid?")
            sid = int(await asyncio.wait_for(ws.recv(), 30))
            t0 = time.monotonic()
            for seq in range(count):
                await ws.send(f"{seq} {padding}")
            result["send_time"] = time.monotonic() - t0
            # how far the handlers were when the client had handed its last byte to TCP
            result["handled_when_sent"] = handled_so_far(sid)
            await ws.send("report")
            result["report"] = await asyncio.wait_for(ws.recv(), 120)
            result["total_time"] = time.monotonic() - t0

    monitor = Monitor()
    rss_before = rss_bytes()
    monitor.start()
    try:
        asyncio.run(flood())
    finally:
        monitor.stop.set()
        monitor.join(timeout=10)

    handled, bad = (int(x) for x in result["report"].split())
    assert bad == 0, f"{bad} messages were handled out of order"
    assert handled == count, f"only {handled} of {count} messages were handled"
    growth = monitor.rss_peak - rss_before
    assert growth < 100 * MIB, f"server RSS grew by {growth / MIB:.0f} MiB during the flood"
    # the connection stopped being read while its handlers were behind
    assert monitor.depth_peak < 2000, f"{monitor.depth_peak} events were waiting for the handlers at once"
    # the client was slowed down: when its last send completed, most messages had been handled
    assert result["handled_when_sent"] >= count // 2, (
        f"the client finished sending in {result['send_time']:.1f}s while only "
        f"{result['handled_when_sent']} of {count} messages were handled"
    )
    assert result["total_time"] < 120
