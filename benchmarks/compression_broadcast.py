"""Server CPU and memory of permessage-deflate broadcasts: WarpSocket against its peers.

One channel holds every client; a publisher (client 0) asks for a broadcast, the server
sends one JSON message of ``--size`` bytes to the whole channel, and the publisher asks
for the next only once every client has it (closed loop). Measured per server, over
``--broadcasts`` broadcasts after a warm-up:

- server CPU-seconds per broadcast (utime + stime of the server process, /proc/PID/stat:
  independent of how much of the core it got on a loaded machine);
- bytes on the wire per message and recipient (what the clients read, frame headers included);
- the server's RSS per connection once all are connected and idle, and again right after
  the broadcasts (``VmRSS`` minus the RSS before any client connected).

Servers (``--servers``, comma-separated, each in its own process pinned with taskset):
``warpsocket`` and ``warpsocket-z`` (``--compression``; each message compressed once for
all recipients), ``socketify-z`` (uWebSockets' ``SHARED_COMPRESSOR``, ``app.publish(...,
compress=True)``), ``websockets-z`` (the ``websockets`` default: permessage-deflate with
context takeover, so ``broadcast`` compresses per recipient). The clients offer
``permessage-deflate; client_max_window_bits`` as Chromium does and never inflate (they
count frames and bytes).

    python benchmarks/compression_broadcast.py --recipients 1000 --size 2048 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
PAYLOADS = 64  # distinct messages, broadcast in turn


def payload(size: int, seed: int) -> str:
    """A chat-history JSON document of exactly ``size`` bytes (the same for every server)."""
    rng = random.Random(seed)
    words = "the a to of and message channel user online typing hello thanks ok see you later".split()
    items: list[dict[str, object]] = []
    while True:
        item = {
            "id": 100000 + len(items),
            "user": f"user{rng.randrange(500)}",
            "ts": 1764700000 + rng.randrange(100000),
            "text": " ".join(rng.choice(words) for _ in range(rng.randrange(3, 12))),
        }
        text = json.dumps({"type": "history", "items": [*items, item]})
        if len(text) > size:
            break
        items.append(item)
    text = json.dumps({"type": "history", "items": items, "pad": ""})
    return text[:-2] + "x" * (size - len(text)) + '"}'


# "pub N" broadcasts payload N: consecutive broadcasts differ, as chat traffic does (a
# server with context takeover would otherwise send a repeat as a back-reference).
WARPSOCKET_WORKER = """
import json, warpsocket
PAYLOADS = []
def handle_start(arg):
    PAYLOADS.extend(json.load(open(arg["payloads"])))
def handle_text_message(text, socket_id):
    if text.startswith("pub "):
        warpsocket.send("all", PAYLOADS[int(text[4:])])
    elif text == "sub":
        warpsocket.subscribe(socket_id, "all")
        warpsocket.send(socket_id, "ok")
"""

SOCKETIFY_SERVER = """
import json, sys
from socketify import App, CompressOptions, OpCode
PAYLOADS = json.load(open(sys.argv[2]))
app = App()
def message(ws, msg, opcode):
    if msg.startswith("pub "):
        app.publish("all", PAYLOADS[int(msg[4:])], OpCode.TEXT, True)
    elif msg == "sub":
        ws.subscribe("all")
        ws.send("ok", OpCode.TEXT)
app.ws("/*", {"compression": CompressOptions.SHARED_COMPRESSOR, "max_payload_length": 1 << 24,
              "idle_timeout": 120, "message": message})
app.listen({"port": int(sys.argv[1]), "host": "127.0.0.1"},
           lambda config: print("listening", flush=True))
app.run()
"""

WEBSOCKETS_SERVER = """
import asyncio, json, sys
from websockets.asyncio.server import broadcast, serve
PAYLOADS = json.load(open(sys.argv[2]))
members = set()
async def handler(ws):
    try:
        async for msg in ws:
            if msg.startswith("pub "):
                broadcast(members, PAYLOADS[int(msg[4:])])
            elif msg == "sub":
                members.add(ws)
                await ws.send("ok")
    finally:
        members.discard(ws)
async def main():
    async with serve(handler, "127.0.0.1", int(sys.argv[1]), backlog=4096, max_queue=None):
        print("listening", flush=True)
        await asyncio.Future()
asyncio.run(main())
"""

# The client process: N raw connections, a closed loop of broadcasts, one JSON line out.
CLIENT = r"""
import asyncio, base64, json, os, resource, struct, sys, time

hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, n, warmup, count, kinds = (int(a) for a in sys.argv[1:6])
OFFER = "permessage-deflate; client_max_window_bits"

def frame(data, opcode=0x1):
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    return bytes([0x80 | opcode, 0x80 | len(data)]) + mask + masked

class Conn:
    def __init__(self):
        self.got = 0
        self.bytes = 0

received = 0
target = 0
all_in = None

async def more(stream):
    data = await stream.read(65536)
    if not data:
        raise SystemExit("a server closed a connection")
    return data

async def reader(conn, stream, writer, buf):
    global received
    while True:
        while len(buf) < 2:
            buf += await more(stream)
        size, at = buf[1] & 0x7F, 2
        if size == 126:
            while len(buf) < 4:
                buf += await more(stream)
            size, at = struct.unpack(">H", buf[2:4])[0], 4
        elif size == 127:
            while len(buf) < 10:
                buf += await more(stream)
            size, at = struct.unpack(">Q", buf[2:10])[0], 10
        while len(buf) < at + size:
            buf += await more(stream)
        opcode = buf[0] & 0x0F
        body = bytes(buf[at : at + size])
        del buf[: at + size]
        if opcode == 0x9:  # the server's keepalive: answer it, as a browser does
            writer.write(frame(body, 0xA))
            continue
        if opcode >= 0x8:
            continue
        conn.bytes += at + size
        conn.got += 1
        if conn.got > 1:  # the first frame is the "ok" of the subscription
            received += 1
            if received >= target:
                all_in.set()

async def open_one(i):
    stream, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.0.{1 + i % 8}", 0))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Sec-WebSocket-Extensions: {OFFER}\r\n\r\n").encode())
    head = (await stream.readuntil(b"\r\n\r\n")).decode().lower()
    writer.write(frame(b"sub"))
    conn = Conn()
    return conn, stream, writer, "permessage-deflate" in head

async def main():
    global target, all_in
    opened = []
    for start in range(0, n, 500):
        opened += await asyncio.gather(*(open_one(i) for i in range(start, min(n, start + 500))))
    conns = [c for c, _, _, _ in opened]
    tasks = [asyncio.create_task(reader(c, s, w, bytearray())) for c, s, w, _ in opened]
    while sum(c.got for c in conns) < n:
        await asyncio.sleep(0.05)
    negotiated = sum(1 for *_, z in opened if z)
    print(json.dumps({"event": "idle", "negotiated": negotiated}), flush=True)
    sys.stdin.readline()  # the parent has measured the idle RSS
    publisher = opened[0][2]
    sent = 0
    async def rounds(k):
        global target, all_in
        nonlocal sent
        for _ in range(k):
            all_in = asyncio.Event()
            target = received + n
            publisher.write(frame(f"pub {sent % kinds}".encode()))
            sent += 1
            await all_in.wait()
    await rounds(warmup)
    before = sum(c.bytes for c in conns)
    print(json.dumps({"event": "start"}), flush=True)
    sys.stdin.readline()
    t0 = time.monotonic()
    await rounds(count)
    elapsed = time.monotonic() - t0
    wire = sum(c.bytes for c in conns) - before
    end = {"event": "end", "elapsed": elapsed, "bytes_per_message": wire / (count * n)}
    print(json.dumps(end), flush=True)
    sys.stdin.readline()
    for t in tasks:
        t.cancel()

asyncio.run(main())
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def server_command(name: str, port: int, folder: Path, bodies: list[str]) -> list[str]:
    """The command line of one server, with its payloads in ``folder``."""
    payload_file = folder / "payloads.json"
    payload_file.write_text(json.dumps(bodies))
    if name.startswith("warpsocket"):
        worker = folder / "broadcast_worker.py"
        worker.write_text(WARPSOCKET_WORKER)
        return [
            sys.executable, "-m", "warpsocket", str(worker), "--threads", "1",
            "--bind", f"127.0.0.1:{port}", "--worker-arg", json.dumps({"payloads": str(payload_file)}),
            "--max-backpressure", str(64 << 20),
            *(["--compression"] if name == "warpsocket-z" else []),
        ]  # fmt: skip
    script = folder / f"{name}.py"
    script.write_text({"socketify-z": SOCKETIFY_SERVER, "websockets-z": WEBSOCKETS_SERVER}[name])
    return [sys.executable, str(script), str(port), str(payload_file)]


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def run_one(name: str, port: int, args: argparse.Namespace, bodies: list[str]) -> dict[str, float]:
    """One server, one client run: the figures of one round."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cmd = ["taskset", "-c", args.server_cpu, *server_command(name, port, folder, bodies)]
        log = open(folder / "server.log", "wb")  # noqa: SIM115
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        client = None
        try:
            wait_port(port, server)
            time.sleep(0.5)
            rss0 = rss_kib(server.pid)
            client = subprocess.Popen(
                ["taskset", "-c", args.client_cpu, sys.executable, "-c", CLIENT, str(port),
                 str(args.recipients), str(args.warmup), str(args.broadcasts), str(len(bodies))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert client.stdin is not None and client.stdout is not None

            def event(expect: str) -> dict[str, float]:
                assert client is not None and client.stdout is not None
                line = client.stdout.readline()
                if not line:
                    raise RuntimeError(f"client ended before {expect!r}")
                got = json.loads(line)
                if got["event"] != expect:
                    raise RuntimeError(f"client said {got}, expected {expect}")
                return got

            idle = event("idle")
            time.sleep(1.0)
            rss_idle = rss_kib(server.pid)
            client.stdin.write("\n")
            client.stdin.flush()
            event("start")
            cpu0 = cpu_seconds(server.pid)
            client.stdin.write("\n")
            client.stdin.flush()
            end = event("end")
            cpu = cpu_seconds(server.pid) - cpu0
            rss_load = rss_kib(server.pid)
            client.stdin.write("\n")
            client.stdin.flush()
            n = args.recipients
            return {
                "negotiated": idle["negotiated"],
                "cpu_ms_per_broadcast": cpu * 1000 / args.broadcasts,
                "server_cpu_pct": 100 * cpu / end["elapsed"],
                "bytes_per_message": end["bytes_per_message"],
                "rss_idle_bytes_per_conn": (rss_idle - rss0) * 1024 / n,
                "rss_load_bytes_per_conn": (rss_load - rss0) * 1024 / n,
            }
        finally:
            if client is not None:
                client.kill()
                client.wait()
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()


FIELDS = [
    ("negotiated", "negotiated", "{:,.0f}"),
    ("cpu_ms_per_broadcast", "server CPU ms per broadcast", "{:.3f}"),
    ("server_cpu_pct", "server CPU %", "{:.0f}"),
    ("bytes_per_message", "bytes on the wire per message", "{:,.1f}"),
    ("rss_idle_bytes_per_conn", "RSS bytes per connection, idle", "{:,.0f}"),
    ("rss_load_bytes_per_conn", "RSS bytes per connection, after the broadcasts", "{:,.0f}"),
]


def cell(values: list[float], fmt: str) -> str:
    med = fmt.format(statistics.median(values))
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return med if lo == hi else f"{med} ({lo}–{hi})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default="warpsocket,warpsocket-z,socketify-z,websockets-z")
    parser.add_argument("--recipients", type=int, default=1000)
    parser.add_argument("--size", type=int, default=2048, help="bytes of JSON per broadcast")
    parser.add_argument("--broadcasts", type=int, default=300, help="measured broadcasts per round")
    parser.add_argument("--warmup", type=int, default=30, help="broadcasts before the measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the servers alternate within each")
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--client-cpu", default="1")
    parser.add_argument("--base-port", type=int, default=23000)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    servers = args.servers.split(",")
    bodies = [payload(args.size, seed) for seed in range(PAYLOADS)]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    port = args.base_port
    for round_no in range(args.rounds):
        # Alternate the order so no server always runs first (or last) in a round.
        order = servers if round_no % 2 == 0 else servers[::-1]
        for name in order:
            port += 1
            got = run_one(name, port, args, bodies)
            results[name].append(got)
            print(f"# round {round_no + 1} {name}: {json.dumps(got)}", file=sys.stderr, flush=True)
    print(f"{args.recipients:,} recipients, {args.size:,}-byte JSON, ", end="")
    print(f"{args.broadcasts} broadcasts x {args.rounds} rounds")
    print()
    print("| figure | " + " | ".join(servers) + " |")
    print("|---|" + "---|" * len(servers))
    for key, title, fmt in FIELDS:
        print(f"| {title} | " + " | ".join(cell([r[key] for r in results[s]], fmt) for s in servers) + " |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}))


if __name__ == "__main__":
    main()
