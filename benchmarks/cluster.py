#!/usr/bin/env python3
"""The performance workload over two cluster nodes (Redis in between) against one node.

    python3 benchmarks/cluster.py                   # {1000, 10000} x {single, cluster} x 2
    python3 benchmarks/cluster.py --connections 1000 --repeat 1
    python3 benchmarks/cluster.py --connections 1000 --setups cluster,cluster-history --repeat 3

Both setups run ``examples/performance/worker.py`` with ``{"buckets": "shared"}``: bucket
numbers come from a counter in the kv store, so in the cluster each channel of 10 holds
clients of both nodes (connections go round-robin over the ports, half of them on each
node) and every request's broadcast crosses Redis once.

- ``single``: one WarpSocket process (``--threads 1``) on every port, no Redis.
- ``cluster``: ``redis-server`` and two WarpSocket nodes (``--threads 1`` each,
  ``--cluster``), half of the ports each.
- ``cluster-history``: ``cluster`` with every channel a history channel
  (``--history '=100/300'``, stamps on): each broadcast is sequenced in Redis by a Lua
  script (``EVALSHA``, one per batch of the node's publisher) and every node, the
  sender's included, delivers it when it comes back from Redis pub/sub. The events
  arrive stamped (``OFFSET:{"type":"evt",...}``); the generator finds the ``"type"``
  field wherever it is in the payload, so it counts them as it does unstamped ones.

Rounds alternate the setups (the order flips every round), so a drift of the shared
machine's load hits every setup alike.

Every server process (Redis included) is pinned to core 0 (``--server-cpu``), the
``warpsocket-bench`` load generator and this script to core 1, as in ``run.py``. Besides
the generator's figures (acks/s, frames/s, req → ack latency) it measures:

* delivery latency: a probe client sends a request on the last port (node B) for a
  channel whose only subscriber is a client on the first port (node A), and times
  request → event at that subscriber; 200 probes with the server idle before the load,
  and probes every 20 ms during the measurement window;
* cross-node messages/s: Redis ``PUBLISH`` calls over the window (``INFO commandstats``,
  which counts those a script makes too: for ``cluster-history`` one per message
  sequenced);
* server CPU s: all server processes together, Redis included, over the window; node
  CPU per request (the two nodes' CPU over the window / acks) and Redis CPU per message
  (Redis's CPU / messages published or sequenced);
* frames per ack: every request's broadcast reaches the 10 members of its channel and
  the sender gets its ack, so a complete delivery reads close to 11.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402 - the runner's helpers: same measurement as run.py
from websockets.asyncio.client import connect  # noqa: E402

SHARED = json.dumps({"buckets": "shared"})
SETUPS = ("single", "cluster", "cluster-history")
BUCKET_SIZE = 10
IDLE_PROBES = 200
PROBE_INTERVAL_S = 0.02


@dataclass
class Outcome:
    setup: str
    connections: int
    run: int
    figures: dict = field(default_factory=dict)
    idle_ms: list[float] = field(default_factory=list)
    loaded_ms: list[float] = field(default_factory=list)
    lost_probes: int = 0
    publishes: int | None = None
    sequenced: int | None = None
    #: Redis commands over the window: name -> (calls, usec per call) from INFO commandstats.
    commands: dict[str, tuple[int, float]] = field(default_factory=dict)
    server_cpu_s: float | None = None
    redis_cpu_s: float | None = None
    peak_rss_mib: float | None = None
    note: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A throwaway ``redis-server`` with no persistence, on the CPUs ``cpu`` (a taskset
    list; None: wherever the kernel puts it)."""

    def __init__(self, cpu: str | None, log_file):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        pin = ["taskset", "-c", cpu] if cpu is not None else []
        self.proc = subprocess.Popen(
            [*pin, shutil.which("redis-server") or "redis-server",
             "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while self.cli("PING") != "PONG":
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.1)

    def cli(self, *args: str) -> str:
        done = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True)
        return done.stdout.strip()

    def calls(self) -> dict[str, tuple[int, int]]:
        """``INFO commandstats``: command -> (calls, usec), commands run by scripts included.

        A script's ``usec`` covers the commands it runs, which count their own too.
        """
        found = {}
        for line in self.cli("INFO", "commandstats").splitlines():
            if line.startswith("cmdstat_"):
                name, rest = line[len("cmdstat_") :].split(":", 1)
                fields = dict(kv.split("=", 1) for kv in rest.split(","))
                found[name] = (int(fields["calls"]), int(fields["usec"]))
        return found

    def publishes(self) -> int:
        return self.calls().get("publish", (0, 0))[0]

    def listeners(self, channel: str) -> int:
        """Nodes listening on ``channel``, plain (``warpsocket:c:``) or history (``:h:``)."""
        total = 0
        for kind in "ch":
            out = self.cli("PUBSUB", "NUMSUB", f"warpsocket:{kind}:{channel}").splitlines()
            total += int(out[1]) if len(out) == 2 else 0
        return total


#: The history policy of the ``cluster-history`` setup: every channel, 100 kept, 300 s.
HISTORY = "=100/300"


def node_command(ports: list[int], cpu: str, cluster: str | None, history: bool = False) -> list[str]:
    binds = [arg for p in ports for arg in ("--bind", f"127.0.0.1:{p}")]
    extra = ["--cluster", cluster] if cluster else []
    if history:
        extra += ["--history", HISTORY]
    return [
        "taskset", "-c", cpu, sys.executable, "-m", "warpsocket", str(bench.WORKER), *binds,
        "--threads", "1", "--worker-arg", SHARED, "--log-level", "WARNING", *extra,
    ]  # fmt: skip


class Probe:
    """A subscriber alone in a channel on one port and a sender on another port."""

    def __init__(self, listen_port: int, send_port: int, redis: Redis | None):
        self.listen_port, self.send_port, self.redis = listen_port, send_port, redis

    async def run(self, fillers: int, count: int | None, stop: threading.Event | None) -> tuple[list, int]:
        """Times request -> event; ``fillers`` more subscribers fill the listener's bucket."""
        url = "ws://127.0.0.1:{}/"
        # The fillers never read: an unbounded queue keeps their close handshakes quick.
        listeners = [
            await connect(url.format(self.listen_port), open_timeout=60, max_queue=None)
            for _ in range(1 + fillers)
        ]
        channel = None
        for ws in listeners:
            await ws.send('{"type":"sub"}')
            ack = json.loads(await asyncio.wait_for(ws.recv(), 60))
            channel = channel or ack["ch"]
        listener = listeners[0]
        if self.redis is not None:  # the owner node listens on Redis asynchronously
            deadline = time.monotonic() + 30
            while self.redis.listeners(channel) < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        samples, lost = [], 0
        async with connect(url.format(self.send_port), open_timeout=60) as sender:
            request = json.dumps({"type": "req", "channel": channel})
            while (count is None or len(samples) + lost < count) and not (stop and stop.is_set()):
                start = time.perf_counter()
                await sender.send(request)
                try:
                    await asyncio.wait_for(listener.recv(), 10)
                    samples.append((time.perf_counter() - start) * 1000)
                except TimeoutError:
                    lost += 1
                await asyncio.wait_for(sender.recv(), 30)  # its ack
                await asyncio.sleep(PROBE_INTERVAL_S)
        self.keep = listeners  # the idle probe's bucket stays full and quiet during the load
        return samples, lost

    async def close(self) -> None:
        await asyncio.gather(*(ws.close() for ws in getattr(self, "keep", [])))


def run_one(setup: str, conns: int, run: int, ports: list[int], args: argparse.Namespace) -> Outcome:
    out = Outcome(setup, conns, run)
    bench.log(f"{setup}: {conns} connections, run {run}, ports {ports[0]}-{ports[-1]}")
    log_file = open(args.log_dir / f"cluster-{setup}-{conns}-{run}.log", "w")  # noqa: SIM115
    redis = Redis(args.server_cpu, log_file) if setup.startswith("cluster") else None
    if redis is None:
        groups = [ports]
    else:
        # Node A gets the even ports, node B the odd ones: the generator's round-robin
        # over the ports then puts every other connection on each node.
        groups = [ports[0::2], ports[1::2]]
    nodes = [
        subprocess.Popen(
            node_command(group, args.server_cpu, redis.url if redis else None, setup == "cluster-history"),
            cwd=bench.ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for group in groups
    ]
    probe = Probe(groups[0][0], groups[-1][-1], redis)
    pids = [n.pid for n in nodes] + ([redis.proc.pid] if redis else [])
    loop = asyncio.new_event_loop()
    try:
        for node, group in zip(nodes, groups, strict=True):
            bench.wait_listening(group, node)
        # Idle: the bucket of 10 (slots 0-9) is the probe's, so the load's buckets stay whole.
        out.idle_ms, out.lost_probes = loop.run_until_complete(probe.run(BUCKET_SIZE - 1, IDLE_PROBES, None))
        gen = subprocess.Popen(
            ["taskset", "-c", args.client_cpu, str(args.bench),
             *[a for p in ports for a in ("--port", str(p))],
             "--connections", str(conns), "--warmup", str(args.warmup),
             "--duration", str(args.duration), "--source-ips", str(args.source_ips),
             *(["--rate", str(args.rate)] if args.rate else [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        marks: dict[str, tuple] = {}
        window_open, window_closed = threading.Event(), threading.Event()

        def sample() -> tuple:
            cpu = [bench.cpu_seconds(pid) for pid in pids]
            return cpu, redis.calls() if redis else {}

        def read_stderr() -> None:
            assert gen.stderr is not None
            for line in gen.stderr:
                line = line.strip()
                if line in ("WINDOW_START", "WINDOW_END"):
                    marks[line] = sample()
                    (window_open if line == "WINDOW_START" else window_closed).set()
                elif line.startswith("error"):
                    out.note = out.note or line[:120]

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        # During the window: a second probe, its listener alone in the bucket after the load's.
        window_open.wait(args.warmup + 300)
        loaded_probe = Probe(groups[0][0], groups[-1][-1], redis)
        if window_open.is_set():
            samples, lost = loop.run_until_complete(loaded_probe.run(0, None, window_closed))
            out.loaded_ms, out.lost_probes = samples, out.lost_probes + lost
        assert gen.stdout is not None
        killer = threading.Timer(args.warmup + args.duration + 300, gen.kill)
        killer.start()
        text = gen.stdout.read()
        gen.wait()
        if not killer.is_alive():
            out.note = out.note or "load generator timed out"
        killer.cancel()
        reader.join(5)
        loop.run_until_complete(loaded_probe.close())
        loop.run_until_complete(probe.close())
        for line in text.splitlines():
            if line.startswith("{"):
                out.figures = json.loads(line)
        if "WINDOW_START" in marks and "WINDOW_END" in marks:
            (cpu0, pub0), (cpu1, pub1) = marks["WINDOW_START"], marks["WINDOW_END"]
            if None not in cpu0 and None not in cpu1:
                deltas = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
                out.server_cpu_s = sum(deltas)
                out.redis_cpu_s = deltas[-1] if redis else None
            if redis:
                for name, (calls1, usec1) in pub1.items():
                    calls0, usec0 = pub0.get(name, (0, 0))
                    if calls1 > calls0:
                        out.commands[name] = (calls1 - calls0, (usec1 - usec0) / (calls1 - calls0))
                out.publishes = out.commands.get("publish", (0, 0.0))[0]
                out.sequenced = out.commands.get("evalsha", (0, 0.0))[0]
        rss = [bench.peak_rss_mib(pid) for pid in pids]
        out.peak_rss_mib = sum(r for r in rss if r is not None)
    except Exception as exc:  # noqa: BLE001 - record and go on with the next run
        out.note = str(exc)[:200]
    finally:
        for node in nodes:
            bench.stop(node)
        if redis is not None:
            bench.stop(redis.proc)
        loop.close()
        log_file.close()
    f = out.figures
    bench.log(
        f"  -> acks/s {f.get('acks_per_s', 0):.0f}, p50 {f.get('p50_ms', 0)} ms, "
        f"idle delivery p50 {pct(out.idle_ms, 50)} ms, loaded p50 {pct(out.loaded_ms, 50)} ms, "
        f"publishes {out.publishes}, evalsha {out.sequenced}, "
        f"node CPU/request {fmt_us(node_cpu_per_request(out))} µs, "
        f"Redis CPU/message {fmt_us(redis_cpu_per_message(out))} µs, frames/ack "
        f"{bench.fmt(frames_per_ack(out), 2)}, Redis commands (calls, usec/call) {commands(out)} {out.note}"
    )
    return out


def node_cpu_per_request(o: Outcome) -> float | None:
    """Seconds of the nodes' CPU (Redis not included) per acked request in the window."""
    acks = o.figures.get("acks")
    if not acks or o.server_cpu_s is None:
        return None
    return (o.server_cpu_s - (o.redis_cpu_s or 0.0)) / acks


def messages(o: Outcome) -> int | None:
    """Messages Redis handled: its PUBLISH calls (the history script publishes each one)."""
    return o.publishes


def redis_cpu_per_message(o: Outcome) -> float | None:
    n = messages(o)
    if not n or o.redis_cpu_s is None:
        return None
    return o.redis_cpu_s / n


def frames_per_ack(o: Outcome) -> float | None:
    acks, frames = o.figures.get("acks"), o.figures.get("frames_received")
    return frames / acks if acks and frames is not None else None


def commands(o: Outcome) -> str:
    """The window's Redis commands, busiest first: ``name calls × usec``."""
    ranked = sorted(o.commands.items(), key=lambda kv: -kv[1][0] * kv[1][1])
    return ", ".join(f"{name} {calls}×{usec:.2f}" for name, (calls, usec) in ranked[:8])


def spread(values: list[float], digits: int) -> str:
    """``median (min–max)`` of ``values``."""
    if not values:
        return "–"
    med = bench.fmt(statistics.median(values), digits)
    if len(values) == 1:
        return med
    return f"{med} ({bench.fmt(min(values), digits)}–{bench.fmt(max(values), digits)})"


def fmt_us(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e6:.2f}"


def pct(samples: list[float], p: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


HEADER = [
    "setup", "connections", "run", "acks/s", "frames/s", "req→ack p50 ms", "p99 ms",
    "idle delivery p50 / p99 ms", "loaded delivery p50 / p99 ms", "cross-node msgs/s",
    "server CPU s (Redis)", "acks per CPU-s", "node CPU µs/req", "Redis CPU µs/msg",
    "frames per ack", "peak RSS MiB", "note",
]  # fmt: skip


def row(o: Outcome, duration: float) -> list[str]:
    f, fmt = o.figures, bench.fmt
    window = f.get("duration_s") or duration
    acks = f.get("acks")
    redis = f" ({fmt(o.redis_cpu_s, 2)})" if o.redis_cpu_s is not None else ""
    lost = f"; {o.lost_probes} probes lost" if o.lost_probes else ""
    return [
        o.setup, f"{o.connections:,}", str(o.run), fmt(f.get("acks_per_s")), fmt(f.get("frames_per_s")),
        fmt(f.get("p50_ms"), 1), fmt(f.get("p99_ms"), 1),
        f"{fmt(pct(o.idle_ms, 50), 2)} / {fmt(pct(o.idle_ms, 99), 2)}",
        f"{fmt(pct(o.loaded_ms, 50), 1)} / {fmt(pct(o.loaded_ms, 99), 1)}",
        fmt(messages(o) / window if messages(o) is not None else None),
        fmt(o.server_cpu_s, 2) + redis,
        fmt(acks / o.server_cpu_s if acks and o.server_cpu_s else None),
        fmt_us(node_cpu_per_request(o)), fmt_us(redis_cpu_per_message(o)),
        fmt(frames_per_ack(o), 2),
        fmt(o.peak_rss_mib), (o.note + lost).replace("|", "/"),
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", default="1000,10000", help="comma-separated counts")
    parser.add_argument(
        "--setups", default="single,cluster", help="comma-separated: single, cluster, cluster-history"
    )
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0, help="measurement window, seconds")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds of load before the window")
    parser.add_argument("--rate", type=float, help="open loop: requests/s in all (default: closed loop)")
    parser.add_argument("--ports", type=int, default=4, help="server ports per run (split over the nodes)")
    parser.add_argument("--base-port", type=int, default=23000)
    parser.add_argument("--source-ips", type=int, default=8, help="client source IPs 127.0.0.1..N")
    parser.add_argument("--server-cpu", default="0", help="taskset CPU list for the servers and Redis")
    parser.add_argument("--client-cpu", default="1", help="CPU list for the generator and the probes")
    parser.add_argument("--bench", type=Path, default=bench.BENCH_BIN, help="warpsocket-bench binary")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/warpsocket-bench-logs"))
    args = parser.parse_args()

    counts = [int(c) for c in args.connections.split(",")]
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    if any(s not in SETUPS for s in setups):
        parser.error(f"--setups takes {', '.join(SETUPS)}")
    if any(c % BUCKET_SIZE for c in counts):
        parser.error("connection counts must be multiples of 10 (whole buckets)")
    needs_redis = any(s.startswith("cluster") for s in setups)
    if needs_redis and not (shutil.which("redis-server") and shutil.which("redis-cli")):
        parser.error("the cluster setup needs redis-server and redis-cli (apt-get install redis-server)")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    os.sched_setaffinity(0, {int(c) for c in args.client_cpu.split(",")})
    bench.raise_fd_limit(max(counts) + 2048)
    bench.ensure_bench_binary(args.bench)

    started = time.time()
    load_at_start = Path("/proc/loadavg").read_text().split()[0]
    outcomes, port = [], args.base_port
    for conns in counts:
        for run in range(1, args.repeat + 1):
            # Round by round, the setups alternate and their order flips.
            for setup in setups if run % 2 else setups[::-1]:
                ports = list(range(port, port + args.ports))
                port += args.ports
                outcomes.append(run_one(setup, conns, run, ports, args))
                time.sleep(1.0)

    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"\n{when}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"window {args.duration:g} s after {args.warmup:g} s warm-up, "
          f"total {time.time() - started:.0f} s, load average at the start {load_at_start}\n")  # fmt: skip
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER))
    for o in outcomes:
        print("| " + " | ".join(row(o, args.duration)) + " |")
    print("\nMedian of the runs (min–max):\n")
    print(
        "| setup | connections | runs | acks/s | idle delivery p50 ms | loaded delivery p50 ms "
        "| cross-node msgs/s | node CPU µs/req | Redis CPU µs/msg | frames per ack |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    medians: dict[tuple[str, int], tuple[float | None, float | None]] = {}
    for conns in counts:
        for setup in setups:
            ok = [o for o in outcomes if o.setup == setup and o.connections == conns and o.figures]
            if not ok:
                print(f"| {setup} | {conns:,} | 0 | failed | | | | | | |")
                continue
            idle = [v for o in ok if (v := pct(o.idle_ms, 50)) is not None]
            loaded = [v for o in ok if (v := pct(o.loaded_ms, 50)) is not None]
            msgs = [n / o.figures["duration_s"] for o in ok if (n := messages(o)) is not None]
            node = [v * 1e6 for o in ok if (v := node_cpu_per_request(o)) is not None]
            red = [v * 1e6 for o in ok if (v := redis_cpu_per_message(o)) is not None]
            fpa = [v for o in ok if (v := frames_per_ack(o)) is not None]
            medians[setup, conns] = (
                statistics.median(node) if node else None,
                statistics.median(red) if red else None,
            )
            cells = [
                str(len(ok)),
                spread([o.figures["acks_per_s"] for o in ok], 0),
                spread(idle, 2),
                spread(loaded, 1),
                spread(msgs, 0),
                spread(node, 2),
                spread(red, 2),
                spread(fpa, 2),
            ]
            print(f"| {setup} | {conns:,} | " + " | ".join(cells) + " |")
    if "cluster" in setups and "cluster-history" in setups:
        print("\ncluster-history / cluster, at the medians (targets: node ≤ 1.3, Redis ≤ 1.25):\n")
        for conns in counts:
            hist, plain = medians.get(("cluster-history", conns)), medians.get(("cluster", conns))
            if not hist or not plain:
                continue
            ratios = [h / p if h and p else None for h, p in zip(hist, plain, strict=True)]
            node, red = (bench.fmt(r, 3) for r in ratios)
            print(f"- {conns:,} connections: node CPU per request {node}×, Redis CPU per message {red}×")
    print(
        "\nRedis commands over the window, per message (calls / messages; median of the runs), and "
        "Redis's own usec per call (commands run by a script count inside its EVALSHA too):\n"
    )
    for conns in counts:
        for setup in setups:
            ok = [o for o in outcomes if o.setup == setup and o.connections == conns and messages(o)]
            names = sorted({n for o in ok for n in o.commands}, key=lambda n: -sum(
                o.commands.get(n, (0, 0.0))[0] * o.commands.get(n, (0, 0.0))[1] for o in ok))  # fmt: skip
            cells = []
            for name in names:
                per_msg = statistics.median(o.commands.get(name, (0, 0.0))[0] / messages(o) for o in ok)
                usec = statistics.median(o.commands[name][1] for o in ok if name in o.commands)
                cells.append(f"{name} {per_msg:.2f} × {usec:.2f} µs")
            if cells:
                print(f"- {setup}, {conns:,}: " + "; ".join(cells))
    return 0 if all(o.figures and not o.note for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
