#!/usr/bin/env python3
"""What the metrics cost per request, counted in instructions (callgrind), on and off.

    python3 benchmarks/metrics_cost.py [--connections 100] [--requests 20] [--rounds 3]

CPU time on a shared machine varies by more than the few percent the metrics may cost;
instruction counts do not. For each round, the server (``--threads 1``, the performance
workload of ``examples/performance/worker.py``) runs under ``valgrind --tool=callgrind``
once without and once with ``--metrics``, in alternating order. Clients connect and
subscribe; then callgrind starts counting, every client makes ``--requests`` requests
(each: one message in, a broadcast to 10 subscribers and an ack out, read to the end by
the clients), and callgrind stops counting. Nothing scrapes ``/metrics`` meanwhile: the
figure is the per-message cost (the scrape cost is per scrape). Prints instructions per
request for each run and the medians. Needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "examples" / "performance" / "worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not listen in time")


def callgrind_control(pid: int, *args: str) -> None:
    done = subprocess.run(
        ["callgrind_control", *args, str(pid)], check=True, capture_output=True, text=True, timeout=600
    )
    # It exits with 0 also when it found no such run.
    if "OK" not in done.stdout:
        raise RuntimeError(f"callgrind_control {args} {pid}: {done.stdout} {done.stderr}")


async def load(port: int, connections: int, requests: int, pid: int) -> int:
    """Connect and subscribe every client, count ``requests`` requests each; return the total."""
    subscribed = asyncio.Semaphore(0)
    go, done, counting = asyncio.Event(), asyncio.Event(), asyncio.Event()
    finished = 0

    async def client() -> None:
        nonlocal finished
        async with connect(f"ws://127.0.0.1:{port}/", open_timeout=600, ping_interval=None) as ws:
            await ws.send('{"type":"sub"}')
            reply = json.loads(await ws.recv())
            while reply["type"] != "sub-ack":
                reply = json.loads(await ws.recv())
            request = json.dumps({"type": "req", "channel": reply["ch"]})
            subscribed.release()
            await go.wait()
            for _ in range(requests):
                await ws.send(request)
                while json.loads(await ws.recv())["type"] != "ack":
                    pass
            finished += 1
            if finished == connections:
                done.set()
            # Keep reading the others' broadcasts until every client is done.
            while not done.is_set():
                try:
                    await asyncio.wait_for(ws.recv(), 0.2)
                except asyncio.TimeoutError:
                    pass
            await counting.wait()

    tasks = [asyncio.create_task(client()) for _ in range(connections)]
    for _ in range(connections):
        await subscribed.acquire()
    await asyncio.to_thread(callgrind_control, pid, "--instr=on")
    go.set()
    await done.wait()
    await asyncio.to_thread(callgrind_control, pid, "--instr=off")
    counting.set()
    await asyncio.gather(*tasks)
    return connections * requests


def total_instructions(out_dir: Path) -> int:
    """Sum of the ``totals:`` lines of callgrind's output files (what was counted)."""
    total = 0
    for path in out_dir.glob("callgrind.out.*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    if total == 0:
        raise RuntimeError("callgrind counted nothing: did callgrind_control reach the server?")
    return total


def run_once(metrics: bool, connections: int, requests: int) -> float:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="warpsocket-callgrind-") as tmp:
        out_dir = Path(tmp)
        extra = ["--metrics", f"127.0.0.1:{free_port()}"] if metrics else []
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
            f"--callgrind-out-file={out_dir}/callgrind.out.%p",
            sys.executable, "-m", "warpsocket", str(WORKER), "--bind", f"127.0.0.1:{port}",
            "--threads", "1", "--log-level", "WARNING", *extra,
        ]  # fmt: skip
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(port, proc)
            handled = asyncio.run(load(port, connections, requests, proc.pid))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(600)
        return total_instructions(out_dir) / handled


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--requests", type=int, default=20, help="requests per connection")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(args.rounds):
        # Alternate which goes first, so neither always runs on a warmer machine.
        order = (False, True) if round_ % 2 == 0 else (True, False)
        for metrics in order:
            per_request = run_once(metrics, args.connections, args.requests)
            results[metrics].append(per_request)
            label = "on " if metrics else "off"
            print(
                f"round {round_ + 1} metrics {label}: {per_request:,.0f} instructions per request", flush=True
            )
    off, on = statistics.median(results[False]), statistics.median(results[True])
    print(
        f"\nmedian: off {off:,.0f}, on {on:,.0f} instructions per request "
        f"({(on - off) / off:+.2%}); {args.connections} connections x {args.requests} requests, "
        f"Python {sys.version.split()[0]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
