"""The seed's headline run: the benchmark workload at 60,000 connections on many cores.

WarpSocket (one process, ``--threads`` worker threads, tokio I/O threads on the same
cores) is pinned to ``--server-cpus``; ``--generators`` load-generator processes, one per
CPU of ``--client-cpus``, share the connections. Prints one JSON line and a table with
the figures of ``benchmarks/run.py`` summed over the generators: acks/s, frames/s,
p50/p99 (the worst generator's), server peak RSS, server CPU seconds in the window
(first generator's window), acks per server CPU-second.

    python3 benchmarks/manycore.py                        # 16 cores: 0-7 server, 8-15 load
    python3 benchmarks/manycore.py --connections 2000 --ports 2 --server-cpus 0 \\
        --client-cpus 1 --threads 1 --warmup 5 --duration 5   # smoke test on 2 cores

The original project reported 60,000 connections, ~120,000 requests/s and ~1,300,000
outgoing messages/s at 1.6 GB RSS on an 8-core laptop (half the cores generating load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the single-server runner's helpers)


def cpus(spec: str) -> list[int]:
    """Expand a taskset-style list such as ``0-7`` or ``8,10,12``."""
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=60_000)
    parser.add_argument("--ports", type=int, default=16)
    parser.add_argument("--base-port", type=int, default=24000)
    parser.add_argument("--server-cpus", default="0-7")
    parser.add_argument("--client-cpus", default="8-15")
    parser.add_argument("--threads", type=int, default=8, help="WarpSocket worker threads")
    parser.add_argument("--generators", type=int, default=0, help="default: one per client CPU")
    parser.add_argument("--source-ips", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--bench", type=Path, default=bench.BENCH_BIN)
    parser.add_argument("--log", type=Path, default=Path("/tmp/warpsocket-manycore-server.log"))
    args = parser.parse_args()

    bench.ensure_bench_binary(args.bench)
    bench.raise_fd_limit(2 * args.connections + 1000)
    client_cpus = cpus(args.client_cpus)
    generators = args.generators or len(client_cpus)
    ports = list(range(args.base_port, args.base_port + args.ports))
    share = [args.connections // generators + (i < args.connections % generators) for i in range(generators)]

    with open(args.log, "w") as server_log:
        server = subprocess.Popen(
            bench.server_command("warpsocket", ports, args.server_cpus, args.threads),
            cwd=bench.ROOT, stdout=server_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            bench.wait_listening(ports, server)
            gens = [
                subprocess.Popen(
                    [
                        "taskset",
                        "-c",
                        str(client_cpus[i % len(client_cpus)]),
                        str(args.bench),
                        *[a for p in ports for a in ("--port", str(p))],
                        "--connections",
                        str(n),
                        "--warmup",
                        str(args.warmup),
                        "--duration",
                        str(args.duration),
                        "--source-ips",
                        str(args.source_ips),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )  # fmt: skip
                for i, n in enumerate(share)
            ]
            marks: dict[str, float | None] = {}

            def watch_first_window() -> None:
                assert gens[0].stderr is not None
                for line in gens[0].stderr:
                    if line.strip() in ("WINDOW_START", "WINDOW_END"):
                        marks[line.strip()] = bench.cpu_seconds(server.pid)

            watcher = threading.Thread(target=watch_first_window, daemon=True)
            watcher.start()
            figures = []
            timeout = args.warmup + args.duration + 600
            for i, gen in enumerate(gens):
                if i == 0:
                    # The watcher reads this one's stderr: communicate() would race it for
                    # the window marks. Its stdout (a JSON line) fits in the pipe meanwhile.
                    gen.wait(timeout=timeout)
                    assert gen.stdout is not None
                    out = gen.stdout.read()
                else:
                    out, _ = gen.communicate(timeout=timeout)
                figures += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            watcher.join(timeout=5)
            peak_rss = bench.peak_rss_mib(server.pid)
        finally:
            bench.stop(server)

    if len(figures) != generators:
        print(f"only {len(figures)} of {generators} generators reported", file=sys.stderr)
        return 1
    cpu_s = None
    if marks.get("WINDOW_START") is not None and marks.get("WINDOW_END") is not None:
        cpu_s = marks["WINDOW_END"] - marks["WINDOW_START"]  # type: ignore[operator]
    acks = sum(f["acks_per_s"] for f in figures)
    total = {
        "connections": sum(f["connections"] for f in figures),
        "generators": generators,
        "acks_per_s": round(acks),
        "frames_per_s": round(sum(f["frames_per_s"] for f in figures)),
        "p50_ms": statistics.median(f["p50_ms"] for f in figures),
        "p99_ms": max(f["p99_ms"] for f in figures),
        "server_peak_rss_mib": peak_rss,
        "server_cpu_s": round(cpu_s, 2) if cpu_s else None,
        "acks_per_server_cpu_s": round(acks * args.duration / cpu_s) if cpu_s else None,
        "errors": sum(f.get("errors", 0) for f in figures),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(total))
    print()
    print("| figure | value |")
    print("|---|---|")
    for key, value in total.items():
        print(f"| {key} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
