#!/usr/bin/env python3
"""One flooding client slows only itself (issue 28): a victim's round trip beside flooders.

    python3 benchmarks/fairness.py [--rounds 3] [--seconds 4] [--warmup 1] [--configs ...]
        [--build NAME=FOLDER ...]
    python3 benchmarks/fairness.py --refusal-cost [--limit 100] [--fast-rate 100000]
        [--seconds 2] [--build NAME=FOLDER ...]
    python3 benchmarks/fairness.py --callgrind [--connections 50] [--requests 20] [--build ...]
    python3 benchmarks/fairness.py --callgrind-flood [--flood-messages 5000] [--build ...]

Needs the ``websockets`` client.

Each configuration runs a fresh server process (this script with ``--serve``): one worker
thread (``threads=1``) whose handler echoes each message, after 1 ms of blocking work
(``time.sleep(0.001)``, as a database call would) or at once (``echo``), optionally with
``max_message_rate``. Flooding clients run in another process (``--flood``): each writes
100-byte text messages as fast as it can (websockets client) and reads the echoes back,
stopping at its deadline even when a send is blocked. The victim, in this process, sends
a message every 10 ms and times its echo; only its sends after the warm-up count.

Configurations are named ``HANDLER:FLOODERS[f][:RATE]``: ``1ms:4`` is the 1 ms handler
with 4 flooders, ``echo:1`` the instant one with 1, ``1ms:1:100`` adds
``max_message_rate=100``. ``1ms:1f:100`` uses a *fast* flooder instead: a load generator
(not a client under test) that upgrades by hand and writes pre-masked frames at
``--fast-rate`` messages/s from one buffer, reconnecting whenever the server ends its
connection. They alternate round by round (every configuration once per round, in
order), so a slow spell of a shared machine hits all of them alike; with several
``--build NAME=FOLDER`` (a ``pip install --target`` of a wheel, put first on the
servers' PYTHONPATH) each configuration runs under each build in turn, the builds'
order alternating by round. Reported per configuration: the victim's p50 and p99 round
trip, the flooders' echoes per second and messages sent per second, each as the median
over the rounds with the min-max, and when flooders were closed (and with what code).

``--refusal-cost``: one fast flooder (one connection, ``--seconds``) against an echo
server with ``max_message_rate=--limit`` and against one without a limit, alternating.
The server's CPU time (its threads' schedstat) from the first frame until every byte
written was read (the client's send queue and the server socket's receive queue empty),
less its idle rate, divided by the messages it read: per refused message with the
limit, per handled message without. A closed connection keeps being read (and its
messages dropped) for the close timeout (3 s), so ``--seconds`` stays under it.

``--callgrind`` (needs valgrind): instructions per request of the seed workload
(``benchmarks/metrics_cost.py``'s driver) for each build, then for the last one with
``max_message_rate``, ``max_connections`` and ``max_connections_per_ip`` set but not hit.
``--callgrind-flood``: instructions per message of the echo server while 1 and then 4
connections each write ``--flood-messages`` frames at once and read the echoes.

Prints each run's figures, then the medians (logged to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fcntl
import json
import logging
import os
import resource
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
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


def parse_config(name: str) -> tuple[str, int, bool, float | None]:
    """``HANDLER:FLOODERS[f][:RATE]`` as its parts: handler, flooders, fast flooders?, rate."""
    handler, flooders, *rate = name.split(":")
    if handler not in HANDLERS or len(rate) > 1:
        raise ValueError(
            f"bad configuration {name!r}: HANDLER:FLOODERS[f][:RATE], HANDLER one of {sorted(HANDLERS)}"
        )
    fast = flooders.endswith("f")
    return handler, int(flooders.removesuffix("f")), fast, float(rate[0]) if rate else None


# -- the server process --------------------------------------------------------


def serve(handler: str, rate: float | None) -> None:
    """Start the server, print its port, serve until stdin closes, print its CPU time and stats."""
    import warpsocket

    with tempfile.TemporaryDirectory() as folder:
        worker = Path(folder) / "fairness_worker.py"
        worker.write_text(WORKER.format(block=HANDLERS[handler]))
        # Passed only when set: builds from before issue 28 have no such option.
        limits: dict[str, Any] = {} if rate is None else {"max_message_rate": rate}
        server = warpsocket.start(worker=str(worker), bind="127.0.0.1:0", threads=1, **limits)
        print(server.port, flush=True)
        before = resource.getrusage(resource.RUSAGE_SELF)
        stats_before: dict[str, Any] = dict(warpsocket.stats())
        sys.stdin.read()
        after = resource.getrusage(resource.RUSAGE_SELF)
        stats: dict[str, Any] = dict(warpsocket.stats())
        server.stop(timeout=5)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    keys = ("messages_in", "rate_limit_closes")
    # .get: builds from before issue 28 have no rate_limit_closes.
    print(json.dumps({"cpu": cpu, **{k: stats.get(k, 0) - stats_before.get(k, 0) for k in keys}}), flush=True)


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


# -- the fast flooder (a load generator, not a client under test) ---------------
#
# The websockets client writes ~2,000-50,000 messages/s from Python: too few to show what a
# refused message costs the server. This one does the upgrade by hand and writes
# pre-masked 100-byte text frames from one big buffer at a paced rate, reading (and
# parsing just enough of) what comes back to see the server's close frame.

MASK = b"\x11\x22\x33\x44"
FRAME = (
    bytes([0x81, 0x80 | len(PAYLOAD)]) + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(PAYLOAD.encode()))
)
FRAMES = FRAME * 10_000


def upgrade(host: str, port: int) -> socket.socket:
    """A TCP connection upgraded to WebSocket by hand, non-blocking."""
    sock = socket.create_connection((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the upgrade")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head.split(b"\r\n")[0].decode())
    sock.setblocking(False)
    return sock


class ServerFrames:
    """Counts the server's (unmasked) frames and notes its close frame's code."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.messages = 0
        self.close_code: int | None = None

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            length = self.buffer[1] & 0x7F
            start = 2
            if length == 126:
                start, length = 4, int.from_bytes(self.buffer[2:4], "big")
            elif length == 127:
                start, length = 10, int.from_bytes(self.buffer[2:10], "big")
            if len(self.buffer) < start + length:
                return
            opcode = self.buffer[0] & 0x0F
            if opcode == 0x8 and self.close_code is None:
                self.close_code = (
                    int.from_bytes(self.buffer[start : start + 2], "big") if length >= 2 else 1005
                )
            elif opcode in (0x1, 0x2):
                self.messages += 1
            del self.buffer[: start + length]


def fast_connection(host: str, port: int, rate: float, until: float) -> dict[str, Any]:
    """One connection writing ``rate`` frames/s until ``until`` or until the server ends it.

    Returns its figures, the socket still open (``sock``) when it outlived ``until``: the
    caller may want to see its buffers drain before dropping it.
    """
    sock = upgrade(host, port)
    frames = ServerFrames()
    sent_bytes = 0
    first = time.monotonic()
    result: dict[str, Any] = {"closed_after": None, "code": None, "ended_after": None}
    while True:
        now = time.monotonic()
        try:
            while data := sock.recv(1 << 16):
                frames.feed(data)
                if frames.close_code is not None and result["closed_after"] is None:
                    result["closed_after"] = time.monotonic() - first
                    result["code"] = frames.close_code
            # recv returned b"": the server ended the TCP connection.
            result["ended_after"] = now - first
            break
        except BlockingIOError:
            pass
        except OSError:
            result["ended_after"] = now - first
            break
        if now >= until:
            result["sock"] = sock
            break
        owed = int((now - first) * rate) * len(FRAME) - sent_bytes
        try:
            while owed > 0:
                offset = sent_bytes % len(FRAME)
                n = sock.send(memoryview(FRAMES)[offset : offset + min(owed, len(FRAMES) - len(FRAME))])
                sent_bytes += n
                owed -= n
        except BlockingIOError:
            pass
        except OSError:
            result["ended_after"] = time.monotonic() - first
            break
        time.sleep(0.0005)
    result.update(sent=sent_bytes // len(FRAME), sent_bytes=sent_bytes, echoes=frames.messages)
    result["seconds"] = min(time.monotonic(), until) - first
    if "sock" not in result:
        sock.close()
    return result


def fast_flood(url: str, clients: int, rate: float, seconds: float, warmup: float) -> list[dict[str, Any]]:
    """``clients`` threads, each writing ``rate`` frames/s; a connection the server ends is
    replaced by a new one (an abusive script reconnects) until the time is up."""
    host, port = url.removeprefix("ws://").rstrip("/").rsplit(":", 1)
    until = time.monotonic() + warmup + seconds
    results: list[dict[str, Any]] = [
        {"sent": 0, "echoes": 0, "closes": [], "connections": 0} for _ in range(clients)
    ]

    def one(total: dict[str, Any]) -> None:
        while time.monotonic() < until:
            r = fast_connection(host, int(port), rate, until)
            if "sock" in r:
                r.pop("sock").close()
            total["sent"] += r["sent"]
            total["echoes"] += r["echoes"]
            total["connections"] += 1
            total["closes"].append((r["closed_after"], r["code"]))

    threads = [threading.Thread(target=one, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


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


def build_env(site: str | None) -> dict[str, str] | None:
    """The environment of a server of the build installed in ``site`` (None: this interpreter's)."""
    if site is None:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    return env


def run_config(
    name: str, seconds: float, warmup: float, site: str | None = None, fast_rate: float = 100_000
) -> dict[str, Any]:
    """One run of configuration ``name``: fresh server (of the build in ``site``), flooders, victim."""
    handler, flooders, fast, rate = parse_config(name)
    argv = [sys.executable, __file__, "--serve", handler]
    if rate is not None:
        argv += ["--rate", str(rate)]
    server = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=build_env(site)
    )
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
                    *(["--fast", str(fast_rate)] if fast else []),
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
    closes = [c for f in floods for c in f.get("closes", [(f.get("closed_after"), f.get("code"))])]
    result: dict[str, Any] = {
        "config": name,
        "p50": statistics.median(rtts),
        "p99": percentile(rtts, 99),
        "samples": len(rtts),
        # The websockets flooders count echoes in the measured window only; the fast
        # ones do not (their echoes are the bursts before each close).
        "flood_rate": sum(f["echoes"] for f in floods) / seconds,
        "sent_rate": sum(f["sent"] for f in floods) / (seconds + warmup),
        "connections": sum(f.get("connections", 1) for f in floods),
        "closes": [(t, code) for t, code in closes if t is not None],
        "server": server_report,
        # The server's CPU time (rusage, all threads, victim included) per message it
        # read: with a generator that cannot saturate the server, the throughput-free figure.
        "server_us_per_message": server_report["cpu"] / server_report["messages_in"] * 1e6
        if server_report["messages_in"]
        else 0.0,
    }
    return result


# -- what a refused message costs ------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid``: the sum of its threads' run time in
    /proc/PID/task/*/schedstat (nanoseconds; /proc/PID/stat's utime+stime count 10 ms
    ticks, too coarse for the ~40 ms a refused flood costs)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return total / 1e9


def unread_bytes(sock: socket.socket, server_port: int) -> int:
    """Bytes the flooder wrote that the server has not read: the client's send queue
    (TIOCOUTQ) plus the server socket's receive queue (/proc/net/tcp)."""
    outq = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    client_port = sock.getsockname()[1]
    rxq = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[1].endswith(f":{server_port:04X}") and parts[2].endswith(f":{client_port:04X}"):
            rxq = int(parts[4].split(":")[1], 16)
    return int(outq) + rxq


def refusal_run(rate: float | None, fast_rate: float, seconds: float, site: str | None) -> dict[str, Any]:
    """One fast flooder (one connection, ``fast_rate`` frames/s for ``seconds``) against a
    fresh echo server with ``max_message_rate=rate`` (None: no limit). The server's CPU
    time is read from /proc between the first frame and the moment every byte written has
    been read by the server (its socket's queues empty), less its idle CPU rate."""
    argv = [sys.executable, __file__, "--serve", "echo"]
    if rate is not None:
        argv += ["--rate", str(rate)]
    server = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=build_env(site)
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        port = int(server.stdout.readline())
        idle_from, idle_cpu = time.monotonic(), cpu_seconds(server.pid)
        time.sleep(1.0)
        idle_rate = (cpu_seconds(server.pid) - idle_cpu) / (time.monotonic() - idle_from)
        t0, c0 = time.monotonic(), cpu_seconds(server.pid)
        r = fast_connection("127.0.0.1", port, fast_rate, t0 + seconds)
        unread = None
        sock = r.pop("sock", None)
        if sock is not None:
            # Keep reading what the server sends (its echoes), or it stops reading us.
            drain_until = time.monotonic() + 15
            while (unread := unread_bytes(sock, port)) and time.monotonic() < drain_until:
                try:
                    while sock.recv(1 << 16):
                        pass
                except (BlockingIOError, OSError):
                    pass
                time.sleep(0.005)
        t1, c1 = time.monotonic(), cpu_seconds(server.pid)
        if sock is not None:
            sock.close()
        server.stdin.close()
        report = json.loads(server.stdout.readline())
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    # Unknown when the server ended the connection first: then all it was sent counts
    # as read, an overcount that flatters the per-message figure (logged).
    read = r["sent"] - (unread or 0) // len(FRAME)
    cpu = (c1 - c0) - idle_rate * (t1 - t0)
    refused = read - report["messages_in"]
    return {
        "limit": rate,
        "offered_rate": r["sent"] / r["seconds"],
        "closed_after": r["closed_after"],
        "code": r["code"],
        "ended_after": r["ended_after"],
        "drained": unread == 0,
        "read": read,
        "delivered": report["messages_in"],
        "refused": refused,
        "cpu_s": cpu,
        "idle_cpu_rate": idle_rate,
        "elapsed_s": t1 - t0,
        "us_per_message_read": cpu / read * 1e6 if read > 0 else None,
        "us_per_refused": cpu / refused * 1e6 if refused > 0 else None,
    }


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def parse_builds(specs: list[str]) -> list[tuple[str, str | None]]:
    """``NAME=SITE`` pairs; none given: this interpreter's own build."""
    if not specs:
        return [("", None)]
    builds: list[tuple[str, str | None]] = []
    for spec in specs:
        name, sep, site = spec.partition("=")
        if not sep or not Path(site, "warpsocket").is_dir():
            raise SystemExit(f"--build {spec!r}: NAME=FOLDER, FOLDER holding a warpsocket package")
        builds.append((name, site))
    return builds


def refusal_main(args: argparse.Namespace, builds: list[tuple[str, str | None]]) -> None:
    """Rounds of the fast flooder against the rate-limited server and the unlimited one."""
    limits: list[float | None] = [args.limit, None]
    runs: dict[str, list[dict[str, Any]]] = {}
    for round_no in range(1, args.rounds + 1):
        order = builds if round_no % 2 else builds[::-1]
        for build, site in order:
            for limit in limits:
                label = (
                    f"{build + '/' if build else ''}{'limit ' + format(limit, 'g') if limit else 'no limit'}"
                )
                r = refusal_run(limit, args.fast_rate, args.seconds, site)
                runs.setdefault(label, []).append(r)
                log.info(
                    "round %d %-22s offered %8.0f msg/s, closed %s after %s s, server read %d"
                    " (%d delivered, %d refused)%s in %.2f s, server CPU %.3f s (idle %.3f CPU-s/s):"
                    " %.3f us per message read%s",
                    round_no,
                    label,
                    r["offered_rate"],
                    r["code"],
                    None if r["closed_after"] is None else round(r["closed_after"], 4),
                    r["read"],
                    r["delivered"],
                    r["refused"],
                    "" if r["drained"] else " (NOT drained: the read count is an upper bound)",
                    r["elapsed_s"],
                    r["cpu_s"],
                    r["idle_cpu_rate"],
                    r["us_per_message_read"] or 0.0,
                    f", {r['us_per_refused']:.3f} us per refused message" if r["us_per_refused"] else "",
                )
    log.info("medians over %d rounds (min-max):", args.rounds)
    for label, results in runs.items():
        line = (
            f"{label:<22} offered {spread([r['offered_rate'] for r in results])} msg/s,"
            f" server read {spread([r['read'] for r in results])} messages,"
            f" server CPU per message read {spread([r['us_per_message_read'] or 0.0 for r in results])} us"
        )
        refused = [r["us_per_refused"] for r in results if r["us_per_refused"]]
        if refused:
            line += f", server CPU per refused message {spread(refused)} us"
        closes = [r["closed_after"] for r in results if r["closed_after"] is not None]
        if closes:
            line += f", closed after {spread(closes, 4)} s"
        log.info("%s", line)


# -- instructions per request (callgrind) ----------------------------------------

LIMITS_NOT_HIT = [
    "--max-message-rate",
    "1000000",
    "--max-connections",
    "100000",
    "--max-connections-per-ip",
    "100000",
]


def callgrind_run(site: str | None, extra: list[str], connections: int, requests: int) -> float:
    """Instructions per request of the seed workload (``benchmarks/metrics_cost.py``'s
    driver: ``examples/performance``, one worker thread, callgrind counting only while the
    clients make their requests) on the build in ``site`` with the server flags ``extra``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import metrics_cost

    port = metrics_cost.free_port()
    with tempfile.TemporaryDirectory(prefix="warpsocket-callgrind-") as tmp:
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
            f"--callgrind-out-file={tmp}/callgrind.out.%p",
            sys.executable, "-m", "warpsocket", str(metrics_cost.WORKER), "--bind", f"127.0.0.1:{port}",
            "--threads", "1", "--log-level", "WARNING", *extra,
        ]  # fmt: skip
        proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=build_env(site)
        )
        try:
            metrics_cost.wait_listening(port, proc)
            handled = asyncio.run(metrics_cost.load(port, connections, requests, proc.pid))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(600)
        return metrics_cost.total_instructions(Path(tmp)) / handled


def callgrind_main(args: argparse.Namespace, builds: list[tuple[str, str | None]]) -> None:
    """Rounds of every build, then the last build with limits set but not hit, alternating."""
    variants: list[tuple[str, str | None, list[str]]] = [(build, site, []) for build, site in builds]
    last, last_site = builds[-1]
    variants.append((f"{last + '+' if last else ''}limits not hit", last_site, LIMITS_NOT_HIT))
    results: dict[str, list[float]] = {}
    for round_no in range(1, args.rounds + 1):
        for label, site, extra in variants if round_no % 2 else variants[::-1]:
            per_request = callgrind_run(site, extra, args.connections, args.requests)
            results.setdefault(label or "this build", []).append(per_request)
            log.info(
                "round %d %-24s %10.0f instructions per request", round_no, label or "this build", per_request
            )
    first = statistics.median(next(iter(results.values())))
    log.info(
        "medians over %d rounds (min-max), %d connections x %d requests:",
        args.rounds,
        args.connections,
        args.requests,
    )
    for label, values in results.items():
        log.info(
            "%-24s %s instructions per request (%+.2f%%)",
            label,
            spread(values),
            (statistics.median(values) / first - 1) * 100,
        )


def flood_callgrind_run(site: str | None, clients: int, messages: int) -> float:
    """Instructions per message of an echo server (one worker thread) flooded by
    ``clients`` connections, each writing ``messages`` frames at once and reading their
    echoes; callgrind counts from the first frame to the last echo."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import metrics_cost

    port = metrics_cost.free_port()
    with tempfile.TemporaryDirectory(prefix="warpsocket-callgrind-") as tmp:
        worker = Path(tmp) / "fairness_worker.py"
        worker.write_text(WORKER.format(block=0.0))
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
            f"--callgrind-out-file={tmp}/callgrind.out.%p",
            sys.executable, "-m", "warpsocket", str(worker), "--bind", f"127.0.0.1:{port}",
            "--threads", "1", "--log-level", "WARNING",
        ]  # fmt: skip
        proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=build_env(site)
        )
        try:
            metrics_cost.wait_listening(port, proc)
            socks = [upgrade("127.0.0.1", port) for _ in range(clients)]
            for sock in socks:
                sock.setblocking(True)
            metrics_cost.callgrind_control(proc.pid, "--instr=on")

            def write(sock: socket.socket) -> None:
                sock.sendall(FRAME * messages)

            def read(sock: socket.socket) -> None:
                frames = ServerFrames()
                while frames.messages < messages:
                    data = sock.recv(1 << 16)
                    if not data:
                        raise ConnectionError("the server ended a flooding connection")
                    frames.feed(data)

            threads = [threading.Thread(target=f, args=(sock,)) for sock in socks for f in (write, read)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            metrics_cost.callgrind_control(proc.pid, "--instr=off")
            for sock in socks:
                sock.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(600)
        return float(metrics_cost.total_instructions(Path(tmp))) / (clients * messages)


def flood_callgrind_main(args: argparse.Namespace, builds: list[tuple[str, str | None]]) -> None:
    """Rounds of every build under 1 and 4 flooding connections, alternating."""
    results: dict[str, list[float]] = {}
    for round_no in range(1, args.rounds + 1):
        for clients in (1, 4):
            for build, site in builds if round_no % 2 else builds[::-1]:
                label = f"{build or 'this build'}, {clients} flooding"
                per_message = flood_callgrind_run(site, clients, args.flood_messages)
                results.setdefault(label, []).append(per_message)
                log.info("round %d %-24s %10.0f instructions per message", round_no, label, per_message)
    log.info(
        "medians over %d rounds (min-max), %d messages per connection:", args.rounds, args.flood_messages
    )
    for label, values in results.items():
        log.info("%-24s %s instructions per message", label, spread(values, 0))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument(
        "--build",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="run the servers with FOLDER (a `pip install --target` of a wheel) first on"
        " PYTHONPATH; repeat to compare builds, which alternate within each round",
    )
    parser.add_argument(
        "--refusal-cost",
        action="store_true",
        help="instead of the victim runs: the server's CPU per message refused by"
        " max_message_rate (--limit) and per message handled without a limit",
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="instead of the victim runs: instructions per request of the seed workload"
        " (metrics_cost.py's driver) for each --build, and the last one with limits set but not hit",
    )
    parser.add_argument(
        "--callgrind-flood",
        action="store_true",
        help="instead of the victim runs: instructions per message of an echo server flooded"
        " by 1 and by 4 connections (--flood-messages each), for each --build",
    )
    parser.add_argument(
        "--flood-messages", type=int, default=5000, help="messages per connection for --callgrind-flood"
    )
    parser.add_argument("--connections", type=int, default=50, help="clients for --callgrind")
    parser.add_argument("--requests", type=int, default=20, help="requests per client for --callgrind")
    parser.add_argument("--limit", type=float, default=100.0, help="max_message_rate for --refusal-cost")
    parser.add_argument(
        "--fast-rate",
        type=float,
        default=100_000,
        help="messages/s of each fast flooder (`Nf` configurations)",
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--flood", help=argparse.SUPPRESS)
    parser.add_argument("--fast", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.serve:
        serve(args.serve, args.rate)
        return
    if args.flood:
        if args.fast:
            floods = fast_flood(args.flood, args.clients, args.fast, args.seconds, args.warmup)
        else:
            floods = asyncio.run(flood(args.flood, args.clients, args.seconds, args.warmup))
        print(json.dumps(floods))
        return
    builds = parse_builds(args.build)
    for build, site in builds:
        where = subprocess.run(
            [sys.executable, "-c", "import warpsocket; print(warpsocket.__file__)"],
            env=build_env(site), capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        log.info("build %r: %s", build or "(this interpreter)", where)
    log.info(
        "host: %s CPUs (os.cpu_count); %d rounds of %s s (+%s s warm-up)",
        os.cpu_count(),
        args.rounds,
        args.seconds,
        args.warmup,
    )
    if args.refusal_cost:
        refusal_main(args, builds)
        return
    if args.callgrind:
        callgrind_main(args, builds)
        return
    if args.callgrind_flood:
        flood_callgrind_main(args, builds)
        return
    for name in args.configs:
        parse_config(name)
    runs: dict[str, list[dict[str, Any]]] = {}
    for round_no in range(1, args.rounds + 1):
        for name in args.configs:
            # The builds' order alternates too: neither always runs right after the other.
            for build, site in builds if round_no % 2 else builds[::-1]:
                label = f"{build}/{name}" if build else name
                result = run_config(name, args.seconds, args.warmup, site, args.fast_rate)
                runs.setdefault(label, []).append(result)
                log.info(
                    "round %d %-16s victim p50 %6.2f ms p99 %6.2f ms (%d samples), flooders %8.0f echoes/s"
                    " (sent %8.0f/s, %d connections), server %.2f us CPU per message, closes %s",
                    round_no,
                    label,
                    result["p50"],
                    result["p99"],
                    result["samples"],
                    result["flood_rate"],
                    result["sent_rate"],
                    result["connections"],
                    result["server_us_per_message"],
                    [(round(t, 3), c) for t, c in result["closes"]][:8],
                )
    log.info("medians over %d rounds (min-max):", args.rounds)
    for label, results in runs.items():
        line = (
            f"{label:<16} victim p50 {spread([r['p50'] for r in results])} ms,"
            f" p99 {spread([r['p99'] for r in results])} ms,"
            f" flooders {spread([r['flood_rate'] for r in results])} echoes/s,"
            f" sent {spread([r['sent_rate'] for r in results])} msg/s,"
            f" server {spread([r['server_us_per_message'] for r in results])} us CPU per message"
        )
        closes = [t for r in results for t, _ in r["closes"]]
        if closes:
            line += f", closed after {spread(closes, 4)} s"
        log.info("%s", line)


if __name__ == "__main__":
    main()
