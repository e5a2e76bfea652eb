#!/usr/bin/env python3
"""A second, independent load generator for the performance workload: picows + uvloop.

Same workload, options, markers and output as ``warpsocket-bench --mode sub`` (see
crates/warpsocket-bench), so ``benchmarks/run.py --client picows`` can use either and no
figure depends on our own generator alone. Each connection sends ``{"type":"sub"}``,
waits for ``{"type":"sub-ack","ch":NAME}``, and then, once every connection is up:

* closed loop (default): sends ``{"type":"req","channel":NAME}``, reads the channel's
  events until ``{"type":"ack"}`` arrives, sends the next request;
* open loop (``--rate R``): R requests per second in all, spread evenly over the
  connections and sent on schedule whether or not earlier ones were answered; latency
  is measured from each request's *scheduled* time (no coordinated omission).

After ``--warmup`` seconds it prints ``WINDOW_START`` to stderr, counts for
``--duration`` seconds, prints ``WINDOW_END``, then one JSON line with the figures to
stdout. It is one Python process on one core: well below what warpsocket-bench can
offer, so compare servers with it at loads it can generate (its own CPU is measured by
run.py) and read its latencies as including its own event-loop delays (uvloop timers
fire with millisecond resolution).

    python3 benchmarks/clients/picows_client.py --port 21000 --connections 1000 --rate 5000
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import os
import re
import sys
import time
from collections import deque

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

TYPE = re.compile(rb'"type"\s*:\s*"([^"]*)"')


class Stats:
    """Counters shared by every connection; only move inside the window."""

    def __init__(self) -> None:
        self.measuring = False
        self.acks = 0
        self.frames = 0
        self.sent = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.latency_s = array.array("d")

    def error(self, msg: str) -> None:
        """Count a failed or broken connection and keep the first few reasons."""
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(msg)


class Client(WSListener):
    """One connection of the workload (closed or open loop)."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.transport: WSTransport | None = None
        self.closed = False
        self.subscribed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.request = b""
        self.open_loop = False
        self.sent_at = 0.0
        # Open loop: the scheduled times of the requests not yet answered, oldest first.
        self.scheduled: deque[float] = deque()
        self.next_due = 0.0
        self.interval = 0.0

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        transport.send(WSMsgType.TEXT, b'{"type":"sub"}')

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError("closed before the sub-ack"))
        else:
            self.stats.error("server closed the connection")

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            return
        payload = frame.get_payload_as_bytes()
        match = TYPE.search(payload)
        kind = match.group(1) if match else b""
        if not self.subscribed.done():
            if kind == b"sub-ack":
                channel = json.loads(payload)["ch"]
                self.request = json.dumps({"type": "req", "channel": channel}).encode()
                self.subscribed.set_result(channel)
            return
        stats = self.stats
        if stats.measuring:
            stats.frames += 1
        if kind != b"ack":
            return
        now = time.perf_counter()
        due = self.scheduled.popleft() if self.open_loop else self.sent_at
        if stats.measuring:
            stats.acks += 1
            stats.latency_s.append(now - due)
        if not self.open_loop:
            self.send_request(now)

    def send_request(self, now: float) -> None:
        """Closed loop: the next request, right after the previous one's ack."""
        assert self.transport is not None
        self.sent_at = now
        self.transport.send(WSMsgType.TEXT, self.request)

    def start_open_loop(self, first_due: float, interval: float) -> None:
        """Open loop: a request at ``first_due`` and every ``interval`` after it."""
        self.open_loop = True
        self.next_due = first_due
        self.interval = interval
        self.fire()

    def fire(self) -> None:
        """Send every request that is due, then sleep until the next one."""
        assert self.transport is not None
        if self.closed:
            return
        now = time.perf_counter()
        while self.next_due <= now:
            self.transport.send(WSMsgType.TEXT, self.request)
            self.scheduled.append(self.next_due)
            self.next_due += self.interval
            if self.stats.measuring:
                self.stats.sent += 1
        asyncio.get_running_loop().call_later(self.next_due - now, self.fire)


async def open_one(args: argparse.Namespace, stats: Stats, index: int) -> Client | None:
    """Connect, upgrade and subscribe connection ``index``; None when that failed."""
    port = args.ports[index % len(args.ports)]
    source = f"127.0.0.{1 + index % args.source_ips}"

    async def connect() -> Client:
        _, client = await ws_connect(
            lambda: Client(stats),
            f"ws://{args.host}:{port}/",
            local_addr=(source, 0),
            websocket_handshake_timeout=args.connect_timeout,
        )
        await client.subscribed
        return client

    try:
        return await asyncio.wait_for(connect(), args.connect_timeout)
    except Exception as exc:  # noqa: BLE001 - counted like the Rust generator does
        stats.error(f"connect {args.host}:{port} from {source}: {exc!r}")
        return None


async def bench(args: argparse.Namespace) -> int:
    """Connect, run the warm-up and the window, print the figures."""
    stats = Stats()
    started = time.perf_counter()
    clients: list[Client] = []
    for first in range(0, args.connections, args.batch):
        last = min(first + args.batch, args.connections)
        opened = await asyncio.gather(*(open_one(args, stats, i) for i in range(first, last)))
        clients.extend(c for c in opened if c is not None)
    connect_s = time.perf_counter() - started
    log(f"connected {len(clients)}/{args.connections} in {connect_s:.2f}s ({stats.errors} errors)")

    now = time.perf_counter()
    if args.rate:
        interval = len(clients) / args.rate
        for n, client in enumerate(clients):
            client.start_open_loop(now + interval * n / len(clients), interval)
    else:
        for client in clients:
            client.send_request(now)
    await asyncio.sleep(args.warmup)
    errors_before = stats.errors
    stats.measuring = True
    window_start = time.perf_counter()
    log("WINDOW_START")
    await asyncio.sleep(args.duration)
    stats.measuring = False
    window = time.perf_counter() - window_start
    log("WINDOW_END")

    for msg in stats.error_samples:
        log(f"error: {msg}")
    latencies = sorted(stats.latency_s)

    def quantile_ms(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0

    figures = {
        "connections": len(clients),
        "duration_s": round(window, 3),
        "acks": stats.acks,
        "acks_per_s": round(stats.acks / window, 1),
        "frames_received": stats.frames,
        "frames_per_s": round(stats.frames / window, 1),
        "p50_ms": round(quantile_ms(0.5), 3),
        "p99_ms": round(quantile_ms(0.99), 3),
        "p999_ms": round(quantile_ms(0.999), 3),
        "errors": stats.errors,
        "errors_in_run": stats.errors - errors_before,
        "connect_s": round(connect_s, 3),
        "rate": args.rate,
        "sent": stats.sent,
        "sent_per_s": round(stats.sent / window, 1),
    }
    sys.stdout.write(json.dumps(figures) + "\n")
    sys.stdout.flush()
    return 0 if clients else 1


def log(msg: str) -> None:
    """Progress and the window markers go to stderr, as warpsocket-bench writes them."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def ports(value: str) -> list[int]:
    """``P`` or ``P1-P2``."""
    low, _, high = value.partition("-")
    return list(range(int(low), int(high or low) + 1))


def main() -> int:
    """Parse the options (those of warpsocket-bench's sub mode) and run."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=ports, action="append", required=True, help="P or P1-P2; repeatable")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--source-ips", type=int, default=8, help="bind to 127.0.0.1..N round-robin")
    parser.add_argument("--batch", type=int, default=500, help="connections opened concurrently")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connect-timeout", type=float, default=20.0)
    parser.add_argument("--rate", type=float, help="open loop: requests/s in all")
    args = parser.parse_args()
    args.ports = [p for group in args.port for p in group]
    try:
        import uvloop
    except ImportError:
        log("uvloop is not installed: running on asyncio's own loop")
        return asyncio.run(bench(args))
    return uvloop.run(bench(args))


if __name__ == "__main__":
    # Do not wait for the connections to close: the OS does that.
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
