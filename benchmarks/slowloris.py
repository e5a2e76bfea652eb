#!/usr/bin/env python3
"""How many slow clients it takes to delay a prompt client by 100 ms: WarpSocket vs socketify.

    python3 benchmarks/slowloris.py                  # 3 rounds, both servers, alternating
    python3 benchmarks/slowloris.py --rounds 1 --servers warpsocket

Each server runs the performance workload (examples/performance, benchmarks/peers) in a
process of its own. A crowd of slow clients, each of which opened a TCP connection and
sent half an upgrade request, grows step by step (from several loopback source addresses,
as a distributed attacker would); every connection the server drops is reopened at once,
so the crowd keeps its size. At each step five prompt clients in turn connect, send
``{"type":"sub"}`` and wait for the ``sub-ack``; the step's delay is their median. The
figure is the first crowd size whose median delay is over 100 ms, or one prompt client
failed ("> N" when even the largest crowd did not get there). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
SERVERS = {
    "warpsocket": lambda port: [
        sys.executable,
        "-m",
        "warpsocket",
        str(ROOT / "examples" / "performance" / "worker.py"),
        "--bind",
        f"127.0.0.1:{port}",
        "--threads",
        "1",
        "--log-level",
        "ERROR",
    ],
    "socketify": lambda port: [
        sys.executable,
        str(ROOT / "benchmarks" / "peers" / "socketify_server.py"),
        "--port",
        str(port),
    ],
}
STEPS = [256, 512, 1024, 1536, 2048, 3072, 4096, 6144, 8192]
SOURCES = [f"127.0.0.{i}" for i in range(2, 34)]
HALF_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
PROMPT_CLIENTS = 5
DELAYED = 0.1
FAILED = 5.0  # a prompt client that got nowhere within this counts as this long


def log(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class Crowd(threading.Thread):
    """Keeps ``target`` slow connections open, reopening each one the server drops."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.target = 0
        self.opened = 0
        self.socks = 0
        self.selector = selectors.DefaultSelector()
        self.halt = threading.Event()
        self.full = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            while self.socks < self.target and not self.halt.is_set():
                source = SOURCES[self.opened % len(SOURCES)]
                self.opened += 1
                try:
                    sock = socket.create_connection(("127.0.0.1", self.port), 5, (source, 0))
                    sock.sendall(HALF_REQUEST)
                except OSError:
                    continue
                self.selector.register(sock, selectors.EVENT_READ)
                self.socks += 1
            self.full.set()
            if not self.socks:
                time.sleep(0.05)
                continue
            # Readable means the server answered or dropped it: reopen it.
            for key, _events in self.selector.select(0.05):
                self.selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
                self.socks -= 1

    def grow(self, target: int) -> None:
        self.full.clear()
        self.target = target
        self.full.wait(120)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        for key in list(self.selector.get_map().values()):
            with contextlib.suppress(OSError):
                key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()


def prompt_delay(port: int) -> float:
    """Seconds for one prompt client to connect, subscribe and get its ack."""
    t0 = time.monotonic()
    try:
        with connect(f"ws://127.0.0.1:{port}/", open_timeout=FAILED, compression=None, proxy=None) as ws:
            ws.send(json.dumps({"type": "sub"}))
            while json.loads(ws.recv(timeout=FAILED)).get("type") != "sub-ack":
                pass
    except Exception:
        return FAILED
    return time.monotonic() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise RuntimeError("server did not listen")


def measure(server: str) -> tuple[int | None, list[tuple[int, float, float]]]:
    """The first crowd size that delays a prompt client by 100 ms (None: none did), and
    ``(crowd, median delay, max delay)`` per step."""
    port = free_port()
    proc = subprocess.Popen(SERVERS[server](port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    crowd = Crowd(port)
    steps = []
    try:
        wait_listening(port, proc)
        crowd.start()
        for size in STEPS:
            crowd.grow(size)
            delays = [prompt_delay(port) for _ in range(PROMPT_CLIENTS)]
            median = statistics.median(delays)
            steps.append((size, median, max(delays)))
            worst = max(delays)
            log(f"{server}: {size} slow: prompt median {median * 1000:.1f} ms, max {worst * 1000:.1f} ms")
            if median > DELAYED or max(delays) >= FAILED:
                return size, steps
        return None, steps
    finally:
        crowd.stop()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--servers", default="warpsocket,socketify")
    args = parser.parse_args()
    servers = args.servers.split(",")
    found: dict[str, list[int | None]] = {s: [] for s in servers}
    for round_number in range(args.rounds):
        # Alternate the order round by round, so neither always runs on a fresher machine.
        order = servers if round_number % 2 == 0 else servers[::-1]
        for server in order:
            size, _steps = measure(server)
            found[server].append(size)
    top = STEPS[-1]
    print(f"slow clients to delay a prompt client by {DELAYED * 1000:.0f} ms ({datetime.date.today()}):")
    print("| server | median | min-max | rounds |")
    print("|---|---|---|---|")
    for server, sizes in found.items():
        # "> top" when a round never got there: counted as one step above, for the median.
        values = [s if s is not None else top * 2 for s in sizes]
        text = [str(s) if s is not None else f"> {top}" for s in sizes]
        median = statistics.median(values)
        shown = f"> {top}" if median > top else f"{median:.0f}"
        low, high = min(values), max(values)
        span = "-".join(dict.fromkeys(f"> {top}" if v > top else str(v) for v in (low, high)))
        print(f"| {server} | {shown} | {span} | {', '.join(text)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
