#!/usr/bin/env python3
"""CPU per request over TLS against plain TCP, for one or more builds, in alternating runs.

    python benchmarks/tls_cost.py --rate 15000 --rounds 3 \\
        --build before=/tmp/ws-before --build after=/tmp/ws-after

Runs the seed workload (``examples/performance/worker.py``, one worker thread) under
``warpsocket-bench`` for every build (a folder holding a ``warpsocket`` package, put first
on ``PYTHONPATH``; by default the installed one) plain and over TLS, the order of the runs
rotating round by round so a noisy spell falls on every configuration alike. The server
is pinned to CPU 0 and the generator to CPU 1, as in run.py. For each run it measures the
server's CPU (utime + stime from ``/proc``) over the generator's window and, with
``--perf``, the server's ``writev``/``sendmsg``/``recvfrom`` calls (``perf stat``).

``--rate`` fixes the offered load (requests/s over all connections, open loop), so plain
and TLS do the same work at the same batching: the fairest comparison of CPU per request
on a shared machine. ``--rate 0`` runs the closed loop (the saturated throughput), where
CPU per request also moves with how much each pass batches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trustme

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "examples" / "performance" / "worker.py"
SYSCALLS = ("writev", "sendmsg", "sendto", "recvfrom", "epoll_wait")
log = logging.getLogger("tls_cost")


@dataclass
class Run:
    """One server run's figures."""

    build: str
    tls: bool
    round: int
    acks: int
    acks_per_s: float
    p99_ms: float
    cpu_s: float
    syscalls: dict[str, int]

    @property
    def us_per_request(self) -> float:
        return self.cpu_s * 1e6 / self.acks if self.acks else float("nan")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not listening on {port}")
        time.sleep(0.1)


def one_run(
    args: argparse.Namespace, build: str, path: str | None, tls: bool, rnd: int, port: int, certs: Path
) -> Run:
    """Starts the server, drives it, measures it over the generator's window."""
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    ports = [port, port + 1]
    tls_args = ["--tls-cert", str(certs / "chain.pem"), "--tls-key", str(certs / "key.pem")] if tls else []
    server = subprocess.Popen(
        ["taskset", "-c", args.server_cpu, sys.executable, "-m", "warpsocket", str(WORKER),
         *[a for p in ports for a in ("--bind", f"127.0.0.1:{p}")], "--threads", "1",
         "--log-level", "WARNING", *tls_args],
        env=env,
    )  # fmt: skip
    perf: subprocess.Popen[bytes] | None = None
    try:
        for p in ports:
            wait_listening(p, server)
        client = subprocess.Popen(
            ["taskset", "-c", args.client_cpu, str(args.bench),
             *[a for p in ports for a in ("--port", str(p))], "--connections", str(args.connections),
             "--warmup", str(args.warmup), "--duration", str(args.duration),
             *(["--rate", str(args.rate)] if args.rate else []),
             *(["--tls-ca", str(certs / "ca.pem")] if tls else [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert client.stdout is not None
        start = end = 0.0
        perf_out = certs / f"perf-{build}-{tls}-{rnd}.csv"
        summary: dict[str, float] = {}
        for line in client.stdout:
            line = line.strip()
            if line == "WINDOW_START":
                start = cpu_seconds(server.pid)
                if args.perf:
                    events = [a for s in SYSCALLS for a in ("-e", f"syscalls:sys_enter_{s}")]
                    perf = subprocess.Popen(
                        ["perf", "stat", "-x", ",", "-o", str(perf_out), *events, "-p", str(server.pid)],
                        stderr=subprocess.DEVNULL,
                    )
            elif line == "WINDOW_END":
                end = cpu_seconds(server.pid)
                if perf is not None:
                    perf.send_signal(signal.SIGINT)
                    perf.wait(timeout=10)
            elif line.startswith("{"):
                summary = json.loads(line)
        client.wait(timeout=60)
        counts: dict[str, int] = {}
        if perf is not None and perf_out.exists():
            for row in perf_out.read_text().splitlines():
                cells = row.split(",")
                if len(cells) > 2 and cells[2].startswith("syscalls:sys_enter_"):
                    with contextlib.suppress(ValueError):
                        counts[cells[2].removeprefix("syscalls:sys_enter_")] = int(cells[0])
        return Run(
            build, tls, rnd, int(summary.get("acks", 0)), float(summary.get("acks_per_s", 0)),
            float(summary.get("p99_ms", 0)), end - start, counts,
        )  # fmt: skip
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--build", action="append", default=[], help="LABEL=DIR with a warpsocket package")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=15000.0, help="requests/s offered; 0: closed loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=6.0)
    parser.add_argument("--perf", action="store_true", help="count the server's syscalls (perf stat)")
    parser.add_argument("--bench", type=Path, default=ROOT / "target" / "release" / "warpsocket-bench")
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--client-cpu", default="1")
    parser.add_argument("--base-port", type=int, default=23200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    builds = [tuple(b.split("=", 1)) for b in args.build] or [("installed", "")]
    configs = [(label, path, tls) for label, path in builds for tls in (False, True)]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp)
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        ca.cert_pem.write_to_path(str(certs / "ca.pem"))
        (certs / "chain.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(certs / "key.pem"))
        port = args.base_port
        for rnd in range(1, args.rounds + 1):
            shift = (rnd - 1) % len(configs)
            for label, path, tls in configs[shift:] + configs[:shift]:
                run = one_run(args, label, path or None, tls, rnd, port, certs)
                port += 3
                per = {k: v / run.acks for k, v in run.syscalls.items()} if run.acks else {}
                log.info(
                    "%s %s round %d: %.0f acks/s, p99 %.1f ms, %.1f µs CPU/request %s",
                    label, "tls" if tls else "plain", rnd, run.acks_per_s, run.p99_ms,
                    run.us_per_request, " ".join(f"{k} {v:.2f}" for k, v in per.items()),
                )  # fmt: skip
                runs.append(run)
    load = os.getloadavg()
    print(f"\n{args.connections} connections, rate {args.rate or 'closed loop'}, {args.rounds} rounds, "
          f"load average at the end {load[0]:.2f}\n")  # fmt: skip
    head = "| build | stream | acks/s | p99 ms | CPU µs/request | " + " | ".join(f"{s}/req" for s in SYSCALLS)
    print(head + " |\n" + "|---" * (5 + len(SYSCALLS)) + "|")
    medians: dict[tuple[str, bool], float] = {}
    for label, _, tls in configs:
        mine = [r for r in runs if r.build == label and r.tls == tls]
        us = [r.us_per_request for r in mine]
        medians[(label, tls)] = statistics.median(us)
        calls = [
            spread([r.syscalls.get(s, 0) / r.acks for r in mine], 2) if mine[0].syscalls else "-"
            for s in SYSCALLS
        ]
        print(
            f"| {label} | {'tls' if tls else 'plain'} | {spread([r.acks_per_s for r in mine], 0)} | "
            f"{spread([r.p99_ms for r in mine])} | {spread(us)} | " + " | ".join(calls) + " |"
        )
    print()
    for label, _ in builds:
        ratios = []
        for rnd in range(1, args.rounds + 1):
            pair = {r.tls: r.us_per_request for r in runs if r.build == label and r.round == rnd}
            ratios.append(pair[True] / pair[False])
        print(
            f"{label}: TLS / plain CPU per request {medians[(label, True)] / medians[(label, False)]:.3f} "
            f"(of the medians); per round {spread(ratios, 3)}"
        )


if __name__ == "__main__":
    main()
