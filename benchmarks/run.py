#!/usr/bin/env python3
"""Run the performance workload against WarpSocket and its peers; print a markdown table.

    python3 benchmarks/run.py                       # everything: 5 servers x 1k/10k x 2
    python3 benchmarks/run.py --servers warpsocket,picows --connections 1000 --repeat 1
    python3 benchmarks/run.py --servers warpsocket,warpsocket+tls,socketify+tls --repeat 3

A server name with ``+tls`` (warpsocket and socketify) runs that server over TLS: the
runner makes a test CA and an ECDSA P-256 certificate for localhost (``trustme``), the
server loads it, and the generator speaks wss:// trusting that CA. Rounds alternate the
servers: round 1 runs each server once, then round 2, and so on.

For each server, connection count and repetition: start the server pinned to core 0
(``taskset -c 0``), wait until every port accepts, run ``warpsocket-bench`` pinned to core 1,
and measure the server from outside:

* CPU seconds: utime + stime of the server process (all its threads) from
  ``/proc/PID/stat``, sampled when the generator prints ``WINDOW_START`` and again at
  ``WINDOW_END``, i.e. over exactly the measurement window (not connect or warm-up).
* Peak RSS: ``VmHWM`` from ``/proc/PID/status`` read just before the server is stopped,
  i.e. the peak over the server's whole life (startup, connects, warm-up and window).

The generator's own CPU use over the window is measured the same way, to show when the
load generator (one core) rather than the server is the limit. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / "peers"
WORKER = ROOT / "examples" / "performance" / "worker.py"
BENCH_BIN = ROOT / "target" / "release" / "warpsocket-bench"
ALL_SERVERS = ["warpsocket", "socketify", "picows", "aiohttp", "websockets"]
#: Servers that can run over TLS (as "NAME+tls").
TLS_SERVERS = ["warpsocket", "socketify"]
TLS_SUFFIX = "+tls"
# Not run by default: WarpSocket with --metrics on, to measure what the metrics cost.
OTHER_SERVERS = ["warpsocket-metrics"]
# server name -> (pip package, import name) for the peers
PEER_PACKAGES = {
    "websockets": ("websockets", "websockets"),
    "aiohttp": ("aiohttp", "aiohttp"),
    "picows": ("picows", "picows"),
    "socketify": ("socketify", "socketify"),
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    server: str
    connections: int
    run: int
    figures: dict = field(default_factory=dict)
    server_cpu_s: float | None = None
    gen_cpu_s: float | None = None
    peak_rss_mib: float | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.figures) and self.figures.get("acks", 0) > 0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def raise_fd_limit(needed: int) -> None:
    """Raise RLIMIT_NOFILE for this process and (inherited) its children."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(hard, needed)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        log(f"warning: open-file limit is {soft}, below the {needed} needed")


def ensure_peers(servers: list[str], install: bool) -> dict[str, str]:
    """Install missing peer packages; returns {server: reason} for those that cannot run."""
    unavailable = {}
    missing = [
        PEER_PACKAGES[s][0]
        for s in servers
        if s in PEER_PACKAGES and importlib.util.find_spec(PEER_PACKAGES[s][1]) is None
    ]
    if missing and install:
        log(f"installing {' '.join(missing)}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=False)
    for s in servers:
        if s not in PEER_PACKAGES:
            continue
        check = subprocess.run(
            [sys.executable, "-c", f"import {PEER_PACKAGES[s][1]}"], capture_output=True, text=True
        )
        if check.returncode != 0 and s == "socketify" and "libuv" in check.stderr and install:
            # socketify ships a native library linked against the system's libuv.
            if shutil.which("apt-get") and os.geteuid() == 0:
                log("socketify needs libuv.so.1: apt-get install -y libuv1")
                subprocess.run(["apt-get", "install", "-y", "-q", "libuv1"], check=False)
            check = subprocess.run([sys.executable, "-c", "import socketify"], capture_output=True, text=True)
        if check.returncode != 0:
            last = (check.stderr.strip().splitlines() or ["import failed"])[-1]
            unavailable[s] = last[:200]
    return unavailable


def ensure_bench_binary(path: Path) -> None:
    if path.exists():
        return
    log("building warpsocket-bench (cargo build --release -p warpsocket-bench)")
    subprocess.run(["cargo", "build", "--release", "-p", "warpsocket-bench"], cwd=ROOT, check=True)


@dataclass(frozen=True)
class Certs:
    """A test CA and a certificate for localhost signed by it (PEM files)."""

    ca: Path
    chain: Path
    key: Path


def make_certs(folder: Path) -> Certs:
    """Write a fresh test CA and an ECDSA localhost certificate into ``folder``."""
    try:
        import trustme
    except ImportError:
        sys.exit("servers over TLS need the trustme package: pip install trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    certs = Certs(folder / "ca.pem", folder / "chain.pem", folder / "key.pem")
    ca.cert_pem.write_to_path(str(certs.ca))
    certs.chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(certs.key))
    return certs


def server_command(
    server: str,
    ports: list[int],
    cpu: str,
    threads: int = 1,
    compression: bool = False,
    *,
    certs: Certs | None = None,
) -> list[str]:
    pin = ["taskset", "-c", cpu]
    tls = ["--tls-cert", str(certs.chain), "--tls-key", str(certs.key)] if certs else []
    if server.startswith("warpsocket"):
        binds = [arg for p in ports for arg in ("--bind", f"127.0.0.1:{p}")]
        # The port after the server's, kept free for it by main().
        metrics = ["--metrics", f"127.0.0.1:{ports[-1] + 1}"] if server == "warpsocket-metrics" else []
        return [
            *pin, sys.executable, "-m", "warpsocket", str(WORKER), *binds, *metrics,
            "--threads", str(threads), "--log-level", "WARNING", *tls,
            *(["--compression"] if compression else []),
        ]  # fmt: skip
    if compression:
        raise ValueError(f"--compression is only wired for warpsocket, not {server}")
    port_args = [arg for p in ports for arg in ("--port", str(p))]
    return [*pin, sys.executable, str(PEERS / f"{server}_server.py"), *port_args, *tls]


def wait_listening(ports: list[int], proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not listening on {pending} after {timeout}s")
        try:
            with socket.create_connection(("127.0.0.1", pending[0]), timeout=0.5):
                pending.pop(0)
        except OSError:
            time.sleep(0.1)


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # after "pid (comm)": fields[11] = utime, fields[12] = stime (man 5 proc, 14 and 15)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_one(
    server: str, conns: int, run: int, ports: list[int], args: argparse.Namespace, certs: Certs | None
) -> Result:
    result = Result(server, conns, run)
    log(f"{server}: {conns} connections, run {run}, ports {ports[0]}-{ports[-1]}")
    server_log = open(args.log_dir / f"{server}-{conns}-{run}.log", "w")  # noqa: SIM115
    base = server.removesuffix(TLS_SUFFIX)
    tls = certs if server.endswith(TLS_SUFFIX) else None
    proc = subprocess.Popen(
        server_command(base, ports, args.server_cpu, compression=args.compression, certs=tls),
        cwd=ROOT, stdout=server_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_listening(ports, proc)
        gen_cmd = [
            "taskset", "-c", args.client_cpu, str(args.bench),
            *[a for p in ports for a in ("--port", str(p))],
            "--connections", str(conns), "--warmup", str(args.warmup),
            "--duration", str(args.duration), "--source-ips", str(args.source_ips),
            *(["--tls-ca", str(tls.ca)] if tls else []),
            *(["--compression"] if args.compression else []),
        ]  # fmt: skip
        gen = subprocess.Popen(gen_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        marks: dict[str, tuple[float | None, float | None]] = {}
        stderr_lines: list[str] = []

        def read_stderr() -> None:
            assert gen.stderr is not None
            for line in gen.stderr:
                line = line.strip()
                if line in ("WINDOW_START", "WINDOW_END"):
                    marks[line] = (cpu_seconds(proc.pid), cpu_seconds(gen.pid))
                else:
                    stderr_lines.append(line)

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        killer = threading.Timer(args.warmup + args.duration + 180, gen.kill)
        killer.start()
        assert gen.stdout is not None
        out = gen.stdout.read()
        gen.wait()
        if not killer.is_alive():
            result.note = "load generator timed out"
        killer.cancel()
        reader.join(timeout=5)
        result.peak_rss_mib = peak_rss_mib(proc.pid)
        for line in out.splitlines():
            if line.startswith("{"):
                result.figures = json.loads(line)
        if "WINDOW_START" in marks and "WINDOW_END" in marks:
            (s0, g0), (s1, g1) = marks["WINDOW_START"], marks["WINDOW_END"]
            if s0 is not None and s1 is not None:
                result.server_cpu_s = s1 - s0
            if g0 is not None and g1 is not None:
                result.gen_cpu_s = g1 - g0
        if proc.poll() is not None:
            result.note = (result.note + f"; server exited with {proc.returncode}").lstrip("; ")
        errs = [line for line in stderr_lines if line.startswith("error")]
        if errs:
            result.note = (result.note + "; " + errs[0][:120]).lstrip("; ")
        if gen.returncode not in (0, None) and not result.figures:
            result.note = (result.note + f"; generator exit {gen.returncode}").lstrip("; ")
    except Exception as exc:  # noqa: BLE001 - record and go on with the next run
        result.note = str(exc)[:200]
    finally:
        stop(proc)
        server_log.close()
    f = result.figures
    log(
        f"  -> acks/s {f.get('acks_per_s', 0):.0f}, frames/s {f.get('frames_per_s', 0):.0f}, "
        f"p50 {f.get('p50_ms', 0)} ms, server CPU {result.server_cpu_s}, "
        f"RSS {result.peak_rss_mib} MiB {result.note}"
    )
    return result


def fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def row(r: Result, duration: float) -> list[str]:
    f = r.figures
    window = f.get("duration_s") or duration
    acks = f.get("acks")
    per_cpu = acks / r.server_cpu_s if acks and r.server_cpu_s else None
    return [
        r.server,
        f"{r.connections:,}",
        str(r.run),
        fmt(f.get("acks_per_s")),
        fmt(f.get("frames_per_s")),
        fmt(f.get("p50_ms"), 1),
        fmt(f.get("p99_ms"), 1),
        fmt(r.peak_rss_mib, 0),
        fmt(r.server_cpu_s, 2),
        fmt(100 * r.server_cpu_s / window if r.server_cpu_s is not None else None, 0),
        fmt(per_cpu),
        fmt(100 * r.gen_cpu_s / window if r.gen_cpu_s is not None else None, 0),
        str(f.get("errors", "–")),
        r.note.replace("|", "/"),
    ]


HEADER = [
    "server", "connections", "run", "acks/s", "frames/s", "p50 ms", "p99 ms",
    "peak RSS MiB", "server CPU s", "server CPU %", "acks per CPU-s", "generator CPU %", "errors", "note",
]  # fmt: skip


def table(results: list[Result], duration: float) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in results:
        lines.append("| " + " | ".join(row(r, duration)) + " |")
    return "\n".join(lines)


def spread(values: list[float], digits: int = 0) -> str:
    """Median (min–max) of ``values``."""
    if not values:
        return "–"
    median = statistics.median(values)
    return f"{fmt(median, digits)} ({fmt(min(values), digits)}–{fmt(max(values), digits)})"


def summary(results: list[Result]) -> str:
    """Median (min–max) over the repetitions of each (server, connections)."""
    head = ["server", "connections", "runs", "acks/s", "p99 ms", "peak RSS MiB", "acks per CPU-s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r.connections, r.server) for r in results))
    for conns, server in keys:
        ok = [r for r in results if r.server == server and r.connections == conns and r.ok]
        if not ok:
            lines.append(f"| {server} | {conns:,} | 0 | failed | | | |")
            continue
        per_cpu = [r.figures["acks"] / r.server_cpu_s for r in ok if r.server_cpu_s]
        cells = [
            server,
            f"{conns:,}",
            str(len(ok)),
            spread([r.figures["acks_per_s"] for r in ok]),
            spread([r.figures["p99_ms"] for r in ok], 1),
            spread([r.peak_rss_mib for r in ok if r.peak_rss_mib is not None]),
            spread(per_cpu),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help=f"comma-separated; {TLS_SUFFIX!r} after one of {TLS_SERVERS} runs it over TLS",
    )
    parser.add_argument("--connections", default="1000,10000", help="comma-separated counts")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0, help="measurement window, seconds")
    parser.add_argument(
        "--warmup",
        type=float,
        default=8.0,
        help="seconds of load before the window (10,000 connections need ~8 s to settle)",
    )
    parser.add_argument("--ports", type=int, default=4, help="server ports per run")
    parser.add_argument("--base-port", type=int, default=21000)
    parser.add_argument("--source-ips", type=int, default=8, help="client source IPs 127.0.0.1..N")
    parser.add_argument("--server-cpu", default="0", help="taskset CPU list for the server")
    parser.add_argument("--client-cpu", default="1", help="taskset CPU list for the generator")
    parser.add_argument("--bench", type=Path, default=BENCH_BIN, help="warpsocket-bench binary")
    parser.add_argument("--no-install", action="store_true", help="do not pip/apt install peers")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/warpsocket-bench-logs"))
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--compression",
        action="store_true",
        help="warpsocket with --compression, clients offering permessage-deflate",
    )
    args = parser.parse_args()

    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    known = ALL_SERVERS + OTHER_SERVERS + [s + TLS_SUFFIX for s in TLS_SERVERS]
    unknown = [s for s in servers if s not in known]
    if unknown:
        parser.error(f"unknown servers {unknown}; choose from {known}")
    counts = [int(c) for c in args.connections.split(",")]
    args.log_dir.mkdir(parents=True, exist_ok=True)
    raise_fd_limit(max(counts) + 2048)
    ensure_bench_binary(args.bench)
    bases = list(dict.fromkeys(s.removesuffix(TLS_SUFFIX) for s in servers))
    missing = ensure_peers(bases, install=not args.no_install)
    unavailable = {s: missing[base] for s in servers if (base := s.removesuffix(TLS_SUFFIX)) in missing}
    for s, why in unavailable.items():
        log(f"skipping {s}: {why}")
    certs = make_certs(args.log_dir) if any(s.endswith(TLS_SUFFIX) for s in servers) else None

    started = time.time()
    load_at_start = Path("/proc/loadavg").read_text().split()[0]
    results: list[Result] = []
    port = args.base_port
    for conns in counts:
        # Round by round, so a change in the machine's load hits every server alike.
        for run in range(1, args.repeat + 1):
            for server in servers:
                if server in unavailable:
                    results.append(Result(server, conns, run, note=f"not run: {unavailable[server]}"))
                    continue
                # Fresh ports every run: no TIME_WAIT leftovers from the previous one.
                ports = list(range(port, port + args.ports))
                port += args.ports + 1  # and one for warpsocket-metrics' metrics address
                results.append(run_one(server, conns, run, ports, args, certs))
                time.sleep(1.0)

    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    print(f"\n{when}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
          f"window {args.duration:g} s after {args.warmup:g} s warm-up, "
          f"total {time.time() - started:.0f} s, load average at the start {load_at_start}\n")  # fmt: skip
    print(table(results, args.duration))
    print("\nMedian of the runs:\n")
    print(summary(results))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 0 if all(r.ok for r in results if r.server not in unavailable) else 1


if __name__ == "__main__":
    sys.exit(main())
