#!/usr/bin/env python3
"""One flooding client slows only itself (issue 28): a victim's round trip beside flooders.

    python3 benchmarks/fairness.py [--rounds 3] [--seconds 4] [--warmup 1] [--configs ...]

Needs the ``websockets`` client.

Each configuration runs a fresh server process (this script with ``--serve``): one worker
thread (``threads=1``) whose handler echoes each message, after 1 ms of blocking work
(``time.sleep(0.001)``, as a database call would) or at once (``echo``), optionally with
``max_message_rate``. Flooding clients run in another process (``--flood``): each writes
100-byte text messages as fast as it can and reads the echoes back. The victim, in this
process, sends a message every 10 ms and times its echo; only its sends after the warm-up
count.

Configurations are named ``HANDLER:FLOODERS[:RATE]``: ``1ms:4`` is the 1 ms handler with
4 flooders, ``echo:1`` the instant one with 1, ``1ms:1:100`` adds ``max_message_rate=100``.
They alternate round by round (every configuration once per round, in order), so a slow
spell of a shared machine hits all of them alike. Reported per configuration: the
victim's p50 and p99 round trip and the flooders' echoes per second, each as the median
over the rounds with the min-max; with a rate limit, how long after its first message each
flooder was closed (and with what code), and the server's CPU time per message it refused.

Prints each run's figures, then the medians (logged to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("fairness-bench")

WORKER = """\
import time

import warpsocket

BLOCK = {block!r}


def handle_text_message(text, socket_id):
    if BLOCK:
        time.sleep(BLOCK)
    warpsocket.send(socket_id, text)
"""

HANDLERS = {"1ms": 0.001, "echo": 0.0}
DEFAULT_CONFIGS = ("1ms:0", "1ms:1", "1ms:4", "echo:1", "echo:4", "1ms:0:100", "1ms:1:100")
PAYLOAD = "x" * 100


def parse_config(name: str) -> tuple[str, int, float | None]:
    """``HANDLER:FLOODERS[:RATE]`` as its parts."""
    handler, flooders, *rate = name.split(":")
    if handler not in HANDLERS or len(rate) > 1:
        raise ValueError(
            f"bad configuration {name!r}: HANDLER:FLOODERS[:RATE], HANDLER one of {sorted(HANDLERS)}"
        )
    return handler, int(flooders), float(rate[0]) if rate else None


# -- the server process --------------------------------------------------------


def serve(handler: str, rate: float | None) -> None:
    """Start the server, print its port, serve until stdin closes, print its CPU time and stats."""
    import warpsocket

    with tempfile.TemporaryDirectory() as folder:
        worker = Path(folder) / "fairness_worker.py"
        worker.write_text(WORKER.format(block=HANDLERS[handler]))
        server = warpsocket.start(worker=str(worker), bind="127.0.0.1:0", threads=1, max_message_rate=rate)
        print(server.port, flush=True)
        before = resource.getrusage(resource.RUSAGE_SELF)
        stats_before = warpsocket.stats()
        sys.stdin.read()
        after = resource.getrusage(resource.RUSAGE_SELF)
        stats = warpsocket.stats()
        server.stop(timeout=5)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    keys = ("messages_in", "rate_limit_closes")
    print(json.dumps({"cpu": cpu, **{k: stats[k] - stats_before[k] for k in keys}}), flush=True)


# -- the flooders' process -----------------------------------------------------


async def flood_one(url: str, deadline: float, start_at: float, end_at: float) -> dict[str, Any]:
    """Send as fast as possible until ``deadline``; count the echoes read in [start_at, end_at).

    ``sent`` counts the messages handed to the client library by the deadline (those it
    buffers included): the flooder stops at the deadline even when its send is blocked.
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    result: dict[str, Any] = {"sent": 0, "echoes": 0, "closed_after": None, "code": None}
    ws = await connect(url, max_size=None, ping_interval=None, compression=None)

    async def read() -> None:
        async for _ in ws:
            if start_at <= time.monotonic() < end_at:
                result["echoes"] += 1

    reader = asyncio.create_task(read())
    first = time.monotonic()
    try:
        # A deadline that cancels a blocked send: with a slow handler the server reads
        # ~250 messages/s per flooder, and a send waiting for the kernel's send buffer
        # (megabytes on loopback, writable again only once a third of it is free) would
        # otherwise wait a minute past the deadline.
        async with asyncio.timeout_at(deadline):
            while True:
                for _ in range(64):
                    await ws.send(PAYLOAD)
                    result["sent"] += 1
                # A send into a transport with room does not yield: let the reader
                # (echoes, and the server's close frame) run.
                await asyncio.sleep(0)
    except TimeoutError:
        pass
    except ConnectionClosed as closed:
        result["closed_after"] = time.monotonic() - first
        result["code"] = closed.rcvd.code if closed.rcvd is not None else None
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    # Dropped, not closed: a close frame would queue behind the megabytes of messages
    # the socket buffers still hold, which the server reads at the handler's pace.
    ws.transport.abort()
    return result


async def flood(url: str, clients: int, seconds: float, warmup: float) -> list[dict[str, Any]]:
    now = time.monotonic()
    return await asyncio.gather(
        *(
            flood_one(url, now + warmup + seconds, now + warmup, now + warmup + seconds)
            for _ in range(clients)
        )
    )


# -- the victim ------------------------------------------------------------------


async def victim(url: str, seconds: float, warmup: float) -> list[float]:
    """Round trips (ms) of one message every 10 ms, those sent after ``warmup``."""
    from websockets.asyncio.client import connect

    rtts = []
    async with connect(url, max_size=None, ping_interval=None, compression=None) as ws:
        start = time.monotonic()
        tick = 0
        while True:
            due = start + tick * 0.010
            now = time.monotonic()
            if due > start + warmup + seconds:
                break
            if due > now:
                await asyncio.sleep(due - now)
            sent = time.perf_counter()
            await ws.send("v")
            await ws.recv()
            if time.monotonic() - start >= warmup:
                rtts.append((time.perf_counter() - sent) * 1000)
            # A late echo skips the ticks it overran, as a real client's timer would.
            tick = max(tick + 1, int((time.monotonic() - start) / 0.010) + 1)
    return rtts


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def run_config(name: str, seconds: float, warmup: float) -> dict[str, Any]:
    """One run of configuration ``name``: fresh server, flooders, victim."""
    handler, flooders, rate = parse_config(name)
    argv = [sys.executable, __file__, "--serve", handler]
    if rate is not None:
        argv += ["--rate", str(rate)]
    server = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdin is not None and server.stdout is not None
    try:
        port = int(server.stdout.readline())
        url = f"ws://127.0.0.1:{port}/"
        flood_proc = None
        if flooders:
            flood_proc = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--flood",
                    url,
                    "--clients",
                    str(flooders),
                    "--seconds",
                    str(seconds),
                    "--warmup",
                    str(warmup),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            # The flooders connect and start first: the victim meets them running.
            time.sleep(0.2)
        rtts = asyncio.run(victim(url, seconds, warmup))
        floods: list[dict[str, Any]] = []
        if flood_proc is not None:
            try:
                out, _ = flood_proc.communicate(timeout=seconds + warmup + 30)
                floods = json.loads(out)
            except subprocess.TimeoutExpired:
                # Seen once in a while with 4 flooders: the run's victim figures stand,
                # its flood figures are missing (reported as 0).
                flood_proc.kill()
                flood_proc.communicate()
                log.warning("%s: the flooders' process did not finish; killed", name)
        server.stdin.close()
        server_report = json.loads(server.stdout.readline())
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    result: dict[str, Any] = {
        "config": name,
        "p50": statistics.median(rtts),
        "p99": percentile(rtts, 99),
        "samples": len(rtts),
        "flood_rate": sum(f["echoes"] for f in floods) / seconds,
        "sent_rate": sum(f["sent"] for f in floods) / (seconds + warmup),
        "closes": [(f["closed_after"], f["code"]) for f in floods if f["closed_after"] is not None],
        "server": server_report,
    }
    if rate is not None and flooders:
        refused = sum(f["sent"] for f in floods) - server_report["messages_in"]
        result["refused"] = refused
        result["cpu_us_per_refused"] = server_report["cpu"] / refused * 1e6 if refused > 0 else None
    return result


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--flood", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.serve:
        serve(args.serve, args.rate)
        return
    if args.flood:
        print(json.dumps(asyncio.run(flood(args.flood, args.clients, args.seconds, args.warmup))))
        return
    for name in args.configs:
        parse_config(name)
    log.info(
        "host: %s CPUs (os.cpu_count); %d rounds of %s s (+%s s warm-up)",
        os.cpu_count(),
        args.rounds,
        args.seconds,
        args.warmup,
    )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.configs}
    for round_no in range(1, args.rounds + 1):
        for name in args.configs:
            result = run_config(name, args.seconds, args.warmup)
            runs[name].append(result)
            log.info(
                "round %d %-10s victim p50 %6.2f ms p99 %6.2f ms (%d samples), flooders %8.0f echoes/s"
                " (sent %8.0f/s), closes %s%s",
                round_no,
                name,
                result["p50"],
                result["p99"],
                result["samples"],
                result["flood_rate"],
                result["sent_rate"],
                [(round(t, 3) if t is not None else None, c) for t, c in result["closes"]],
                f", server CPU {result['cpu_us_per_refused']:.3f} us per refused message"
                if result.get("cpu_us_per_refused") is not None
                else "",
            )
    log.info("medians over %d rounds (min-max):", args.rounds)
    for name, results in runs.items():
        line = (
            f"{name:<10} victim p50 {spread([r['p50'] for r in results])} ms,"
            f" p99 {spread([r['p99'] for r in results])} ms,"
            f" flooders {spread([r['flood_rate'] for r in results])} echoes/s"
        )
        closes = [t for r in results for t, _ in r["closes"] if t is not None]
        if closes:
            line += f", closed after {spread(closes)} s"
        cpu = [r["cpu_us_per_refused"] for r in results if r.get("cpu_us_per_refused") is not None]
        if cpu:
            line += f", server CPU per refused message {spread(cpu)} us"
        log.info("%s", line)


if __name__ == "__main__":
    main()
