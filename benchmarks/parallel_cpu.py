"""CPU-bound handlers on 1, 2, 4 worker threads: do they run in parallel?

Each message costs real CPU in the handler: a pure-Python arithmetic loop calibrated at
startup to take about ``--cost-us`` microseconds (200 by default) on this interpreter.
The server runs in this process; a light load generator runs in a separate process:
``--connections`` WebSocket clients, each keeping one request in flight (send, wait for the
reply, send again). For every worker count it measures requests/s over ``--duration``
seconds (after a warm-up) and the server process's CPU use, and prints a table (``--json
FILE`` also writes every run's figures).

On a free-threaded interpreter (3.13t, GIL disabled) the handlers of different workers run
at the same time, so requests/s should grow with the worker count up to the number of
cores; with the GIL they take turns and requests/s stays flat.

Reading the table: "ceiling" is the speedup N plain processes running the same loop got
right after each run, i.e. what the cores allowed at that moment (on a shared machine it
drops below N). The server's I/O threads and the load generator need CPU too: on 2 cores,
with 200 µs handlers they take about a third of the machine, so 2 workers cannot reach 2x
there; ``--cost-us 1000`` shows the scaling of the handlers themselves. "µs CPU/req"
staying flat as workers are added means the workers do not slow each other down.
"non-handler" is that minus the calibrated handler cost: the server's own work per request
(I/O threads, dispatch, the worker's Python-side overhead). "CPU bound" is the most req/s
the cores could give at that CPU per request (server's plus client's), the cores other
processes took left out, as a multiple of the 1-row's req/s: no worker count can beat it.

    python benchmarks/parallel_cpu.py                         # threads 1,2,4; 10 s each
    .venv-ft/bin/python benchmarks/parallel_cpu.py --repeat 3 --threads 1,2

The default client is the Rust load generator (``--client bench``:
``warpsocket-bench --mode echo``, built with ``cargo build --release -p warpsocket-bench``
if missing or stale; a few µs of CPU per request) so that the load generator takes as
little as possible of the cores the server needs. ``--client raw`` is a minimal Python
client on asyncio's protocol layer (precomputed masked frames, some tens of µs per
request) and ``--client websockets`` the ``websockets`` library's asyncio client (more
CPU per request still).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_BIN = ROOT / "target" / "release" / "warpsocket-bench"
MESSAGE = b"x" * 16
# A module next to the worker file that all worker instances share (one per process).
SHARED_SOURCE = "HANDLER_CPU = []  # one [seconds] list per worker\n"

WORKER_SOURCE = """
import time

import parallel_cpu_shared
import warpsocket

ITERATIONS = 0
# This worker's handler CPU seconds, read by the benchmark (measured, not assumed: on a
# shared or virtualised machine a loop iteration does not always cost what it did at
# calibration).
SPENT = [0.0]


def burn(n):
    x = 0
    for i in range(n):
        x = (x * 31 + i) % 1000003
    return x


def handle_start(arg):
    global ITERATIONS
    ITERATIONS = arg["iterations"]
    parallel_cpu_shared.HANDLER_CPU.append(SPENT)


def handle_text_message(text, socket_id):
    t0 = time.thread_time()
    burn(ITERATIONS)
    SPENT[0] += time.thread_time() - t0
    warpsocket.send(socket_id, text)
"""


def burn(n: int) -> int:
    """The handler's work, also used here to calibrate it (same code as WORKER_SOURCE)."""
    x = 0
    for i in range(n):
        x = (x * 31 + i) % 1000003
    return x


def calibrate(cost_us: float) -> tuple[int, float]:
    """Iterations of ``burn`` that take ``cost_us`` µs of CPU; the best of several tries.

    Measured in thread CPU time and sampled for about a second, so that other processes
    competing for the cores (the machine may be shared) inflate it less.
    """
    n = 20_000
    best = float("inf")
    deadline = time.perf_counter() + 1.0
    while time.perf_counter() < deadline:
        t0 = time.thread_time()
        burn(n)
        best = min(best, time.thread_time() - t0)
    per_iteration = best / n
    return max(1, round(cost_us * 1e-6 / per_iteration)), per_iteration * 1e9


# --------------------------------------------------------------------------
# load generator (runs in its own process: --load PORT)
# --------------------------------------------------------------------------


class RawClient(asyncio.Protocol):
    """A minimal WebSocket client: one masked text frame in flight, counts the replies."""

    def __init__(self, port: int, frame: bytes, stats: dict[str, int], connected: asyncio.Future[None]):
        self.port = port
        self.frame = frame
        self.stats = stats
        self.connected = connected
        self.buf = bytearray()
        self.upgraded = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.connected.set_exception(RuntimeError(bytes(buf[:end]).decode(errors="replace")))
                return
            del buf[: end + 4]
            self.upgraded = True
            self.connected.set_result(None)
            self.transport.write(self.frame)  # type: ignore[union-attr]
        while len(buf) >= 2:
            length = buf[1] & 0x7F
            header = 2
            if length == 126:
                header = 4
                if len(buf) < header:
                    return
                length = int.from_bytes(buf[2:4], "big")
            elif length == 127:
                header = 10
                if len(buf) < header:
                    return
                length = int.from_bytes(buf[2:10], "big")
            if len(buf) < header + length:
                return
            opcode = buf[0] & 0x0F
            payload = bytes(buf[header : header + length])
            del buf[: header + length]
            if opcode in (1, 2):
                self.stats["replies"] += 1
                self.transport.write(self.frame)  # type: ignore[union-attr]
            elif opcode == 9:  # ping -> pong (payload < 126 bytes), mask key 0
                self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)  # type: ignore[union-attr]
            elif opcode == 8:
                self.transport.close()  # type: ignore[union-attr]
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("closed during the handshake"))


async def _raw_clients(port: int, connections: int, message: bytes, stats: dict[str, int]) -> list:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(message))
    frame = bytes([0x81, 0x80 | len(message)]) + mask + masked
    loop = asyncio.get_running_loop()
    transports = []
    for _ in range(connections):
        connected = loop.create_future()
        transport, _protocol = await loop.create_connection(
            lambda c=connected: RawClient(port, frame, stats, c), "127.0.0.1", port
        )
        await connected
        transports.append(transport)
    return transports


async def _websockets_clients(port: int, connections: int, message: bytes, stats: dict[str, int]) -> list:
    from websockets.asyncio.client import connect

    text = message.decode()

    async def one(ws) -> None:
        while True:
            await ws.send(text)
            await ws.recv()
            stats["replies"] += 1

    sockets = [await connect(f"ws://127.0.0.1:{port}", compression=None) for _ in range(connections)]
    return [asyncio.create_task(one(ws)) for ws in sockets]


async def load(port: int, connections: int, client: str, warmup: float, duration: float) -> None:
    """Keep ``connections`` requests in flight; report the replies in the measured window."""
    stats = {"replies": 0}
    message = MESSAGE
    if client == "raw":
        handles = await _raw_clients(port, connections, message, stats)
    else:
        handles = await _websockets_clients(port, connections, message, stats)
    await asyncio.sleep(warmup)
    before, t0 = stats["replies"], time.perf_counter()
    print("go", flush=True)
    await asyncio.sleep(duration)
    after, t1 = stats["replies"], time.perf_counter()
    print(json.dumps({"replies": after - before, "seconds": t1 - t0}), flush=True)
    for handle in handles:
        (handle.cancel if isinstance(handle, asyncio.Task) else handle.close)()


# --------------------------------------------------------------------------
# the benchmark (server side)
# --------------------------------------------------------------------------


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used (Linux /proc/stat), else 0."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux /proc), else 0."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu_seconds() -> tuple[float, float]:
    """CPU seconds so far of this process's worker threads and of its I/O threads."""
    workers = {t.native_id for t in threading.enumerate() if t.name.startswith("warpsocket-worker")}
    worker_s = io_s = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if int(tid) in workers:
            worker_s += seconds
        elif comm.startswith("warpsocket-io"):
            io_s += seconds
    return worker_s, io_s


def _snapshot(client_pid: int) -> dict[str, float]:
    """Clocks at one end of the measurement window."""
    import parallel_cpu_shared  # next to the worker file, on sys.path once a server started

    worker_s, io_s = _thread_cpu_seconds()
    return {
        "t": time.perf_counter(),
        "cpu": _cpu_seconds(),
        "busy": _machine_busy_seconds(),
        "client": _process_cpu_seconds(client_pid),
        "handler": sum(spent[0] for spent in parallel_cpu_shared.HANDLER_CPU),
        "worker": worker_s,
        "io": io_s,
    }


def _figures(
    replies: float, seconds: float, start: dict[str, float], end: dict[str, float]
) -> dict[str, float]:
    """One run's figures from the replies in the window and the clocks at its ends."""
    d = {k: end[k] - start[k] for k in start}
    return {
        "rps": replies / seconds,
        "seconds": seconds,
        "cpu_s": d["cpu"],
        "server_cpu": d["cpu"] / seconds,
        "client_cpu": d["client"] / seconds,
        # CPU that other processes took meanwhile: a shared machine makes the numbers noisy
        "other_cpu": max((d["busy"] - d["cpu"] - d["client"]) / seconds, 0.0),
        "handler_s": d["handler"],
        "worker_s": d["worker"],
        "io_s": d["io"],
    }


def ensure_bench(path: Path) -> None:
    """Builds warpsocket-bench when it is the default one (cargo does nothing if it is fresh)."""
    if path == BENCH_BIN:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "warpsocket-bench"], cwd=ROOT, check=True)
    if not path.exists():
        raise SystemExit(f"no load generator at {path}")


def _run_bench(port: int, args: argparse.Namespace) -> dict[str, float]:
    """The Rust load generator in echo mode; the figures of its measurement window."""
    command = [
        str(args.bench), "--port", str(port), "--connections", str(args.connections),
        "--source-ips", "1", "--mode", "echo", "--message", MESSAGE.decode(),
        "--warmup", str(args.warmup), "--duration", str(args.duration),
    ]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        marks: dict[str, dict[str, float]] = {}
        lines = []
        for line in proc.stderr:
            lines.append(line)
            mark = line.strip()
            if mark in ("WINDOW_START", "WINDOW_END"):
                marks[mark] = _snapshot(proc.pid)
                if mark == "WINDOW_END":
                    break
        out = proc.stdout.read()
        proc.wait(timeout=30)
    if len(marks) != 2 or not out.strip():
        raise RuntimeError(f"load generator failed: {''.join(lines[-5:])}{out}")
    result = json.loads(out)
    run = _figures(result["acks"], result["duration_s"], marks["WINDOW_START"], marks["WINDOW_END"])
    # Connections that broke (e.g. closed with 1011 when a worker was retired as hung).
    run["errors"] = result["errors"]
    return run


def _run_python_client(port: int, args: argparse.Namespace) -> dict[str, float]:
    """A Python load generator (``--load``) in a child process; the figures of its window."""
    command = [
        sys.executable, os.path.abspath(__file__), "--load", str(port),
        "--connections", str(args.connections), "--client", args.client,
        "--warmup", str(args.warmup), "--duration", str(args.duration),
    ]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "go":
            raise RuntimeError(f"load generator failed: {line!r}")
        start = _snapshot(proc.pid)
        line = proc.stdout.readline()
        end = _snapshot(proc.pid)
        proc.wait(timeout=30)
    result = json.loads(line)
    return _figures(result["replies"], end["t"] - start["t"], start, end)


def measure(worker: str, threads: int, iterations: int, args: argparse.Namespace) -> dict[str, float]:
    """One run: a server with ``threads`` workers under the load generator."""
    import warpsocket

    with warpsocket.start(
        "127.0.0.1:0", worker, threads=threads, worker_arg={"iterations": iterations}, ping_interval=300.0
    ) as server:
        gil = sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True
        if args.client == "bench":
            run = _run_bench(server.port, args)
        else:
            run = _run_python_client(server.port, args)
    run["gil"] = float(gil)
    return run


def _burn_for(seconds: float, iterations: int = 1000) -> int:
    """Calls of ``burn(iterations)`` done in ``seconds`` of wall time (a control process)."""
    t0 = time.perf_counter()
    calls = 0
    while time.perf_counter() - t0 < seconds:
        burn(iterations)
        calls += 1
    return calls


def control(processes: int, seconds: float) -> float:
    """``burn`` calls/s of ``processes`` separate processes: what the cores allow right now.

    Processes share no interpreter, so this is the ceiling for any speedup from more
    workers on this machine at this moment (other jobs on a shared machine lower it).
    """
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_burn_for, [0.2] * processes)  # start-up and warm-up
        return sum(pool.map(_burn_for, [seconds] * processes)) / seconds


def describe_interpreter() -> str:
    free_threaded = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    kind = "free-threaded" if free_threaded else "with GIL"
    gil = sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True
    state = "enabled" if gil else "disabled"
    return f"{platform.python_implementation()} {platform.python_version()} {kind} (GIL {state})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2,4", help="worker counts to measure (default 1,2,4)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per run (default 10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (default 1)")
    parser.add_argument("--connections", type=int, default=8, help="client connections (default 8)")
    parser.add_argument(
        "--cost-us", type=float, default=200.0, help="handler CPU per message in µs (default 200)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per worker count; the median is shown")
    parser.add_argument(
        "--client",
        choices=("bench", "raw", "websockets"),
        default="bench",
        help="load generator: bench (warpsocket-bench --mode echo, the default), raw or websockets "
        "(Python clients on asyncio)",
    )
    parser.add_argument(
        "--bench", type=Path, default=BENCH_BIN, help=f"warpsocket-bench binary (default {BENCH_BIN})"
    )
    parser.add_argument("--json", type=Path, help="also write every run's figures to this file")
    parser.add_argument(
        "--control",
        type=float,
        default=3.0,
        help="seconds of the process-based ceiling measurement after each run (0: skip; default 3)",
    )
    parser.add_argument(
        "--max-others",
        type=float,
        default=0.3,
        help="measure a run again when other processes took more CPU than this (cores; default 0.3)",
    )
    parser.add_argument("--retries", type=int, default=3, help="at most this many times (default 3)")
    parser.add_argument("--load", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.load is not None:
        asyncio.run(load(args.load, args.connections, args.client, args.warmup, args.duration))
        return

    import warpsocket

    thread_counts = [int(t) for t in args.threads.split(",")]
    if args.client == "bench":
        ensure_bench(args.bench)
    iterations, ns_per_iteration = calibrate(args.cost_us)
    print(describe_interpreter())
    print(
        f"warpsocket {getattr(warpsocket, '__version__', '?')} "
        f"({os.path.basename(warpsocket._core.__file__)}), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"handler: {iterations} loop iterations ≈ {args.cost_us:.0f} µs of CPU "
        f"({ns_per_iteration:.1f} ns each); "
        f"{args.connections} {args.client} clients, 1 request in flight each; "
        f"{args.duration:.0f} s per run, {args.repeat} run(s) per row"
    )
    with tempfile.TemporaryDirectory() as tmp:
        worker = os.path.join(tmp, "parallel_cpu_worker.py")
        with open(worker, "w") as f:
            f.write(textwrap.dedent(WORKER_SOURCE))
        with open(os.path.join(tmp, "parallel_cpu_shared.py"), "w") as f:
            f.write(SHARED_SOURCE)
        # Repeats go round the worker counts (1, 2, 4, 1, 2, 4, ...) so that a busy spell on
        # a shared machine does not hit one row only.
        rows: list[tuple[int, list[dict[str, float]]]] = [(t, []) for t in thread_counts]
        for _ in range(args.repeat):
            for threads, runs in rows:
                for attempt in range(args.retries + 1):
                    run = measure(worker, threads, iterations, args)
                    if run.get("errors"):
                        print(
                            f"  threads={threads}: {run['errors']} client connections broke during the "
                            f"run (see the log above): measuring again",
                            flush=True,
                        )
                        continue
                    if run["other_cpu"] <= args.max_others or attempt == args.retries:
                        break
                    print(
                        f"  threads={threads}: {run['rps']:.0f} req/s but other processes took "
                        f"{run['other_cpu'] * 100:.0f}% CPU: measuring again",
                        flush=True,
                    )
                if args.control > 0:
                    run["control"] = control(threads, args.control)
                runs.append(run)
                print(
                    f"  threads={threads}: {run['rps']:.0f} req/s, "
                    f"server CPU {run['server_cpu'] * 100:.0f}%, others {run['other_cpu'] * 100:.0f}%"
                    + (f", control {run['control']:.0f} burns/s" if "control" in run else "")
                    + ("  (GIL enabled)" if run["gil"] else ""),
                    flush=True,
                )

    base = statistics.median(r["rps"] for r in rows[0][1])
    control_base = statistics.median(r.get("control", 0.0) for r in rows[0][1])
    cores = os.cpu_count() or 1

    def per_request(runs: list[dict[str, float]], key: str) -> float:
        """Median over the runs of ``key`` (CPU seconds in the window) per request, in µs."""
        return statistics.median(r[key] / (r["rps"] * r["seconds"]) * 1e6 for r in runs)

    print()
    print(f"{'':>31} {'':>8} {'':>7} {'':>10}   {'µs of CPU per request':-^47}")
    print(
        f"{'threads':>7} {'req/s':>7} {'speedup':>7} {'ceiling':>7} {'CPU bound':>9} {'cpu_s':>7} "
        f"{'server CPU':>10}   {'server':>7} {'handler':>7} {'non-h.':>7} {'worker':>7} {'I/O':>7} "
        f"{'client':>7} {'others CPU':>10} {'runs (req/s)':>20}"
    )
    summary = []
    for threads, runs in rows:
        rps = statistics.median(r["rps"] for r in runs)
        ceiling = statistics.median(r.get("control", 0.0) for r in runs) / control_base if control_base else 0
        cpu_s = statistics.median(r["cpu_s"] for r in runs)
        server_cpu = statistics.median(r["server_cpu"] for r in runs)
        other_cpu = statistics.median(r["other_cpu"] for r in runs)
        server_us = per_request(runs, "cpu_s")
        handler_us = per_request(runs, "handler_s")
        for r in runs:
            r["non_handler_s"] = r["cpu_s"] - r["handler_s"]
            r["worker_rest_s"] = r["worker_s"] - r["handler_s"]
            r["client_s"] = r["client_cpu"] * r["seconds"]
        non_handler_us = per_request(runs, "non_handler_s")
        worker_rest_us = per_request(runs, "worker_rest_s")
        io_us = per_request(runs, "io_s")
        client_us = per_request(runs, "client_s")
        # The most req/s the cores left by other processes allow at this CPU per request
        # (server's and client's), as a multiple of the 1-row's req/s.
        bound = statistics.median(
            max(cores - r["other_cpu"], 0.0) / ((r["cpu_s"] + r["client_s"]) / (r["rps"] * r["seconds"]))
            for r in runs
        )
        spread = " ".join(f"{r['rps']:.0f}" for r in runs)
        print(
            f"{threads:>7} {rps:>7.0f} {rps / base:>6.2f}x {f'{ceiling:.2f}x' if ceiling else '-':>7} "
            f"{bound / base:>8.2f}x {cpu_s:>7.2f} {server_cpu * 100:>9.0f}%   {server_us:>7.0f} "
            f"{handler_us:>7.0f} {non_handler_us:>7.0f} {worker_rest_us:>7.0f} {io_us:>7.0f} "
            f"{client_us:>7.0f} {other_cpu * 100:>9.0f}% {spread:>20}"
        )
        summary.append(
            {
                "threads": threads,
                "rps": rps,
                "speedup": rps / base,
                "ceiling": ceiling or None,
                "cpu_bound": bound / base,
                "cpu_s": cpu_s,
                "server_cpu": server_cpu,
                "us_per_request": {
                    "server": server_us,
                    "handler": handler_us,
                    "non_handler": non_handler_us,
                    "worker_rest": worker_rest_us,
                    "io_threads": io_us,
                    "client": client_us,
                },
                "other_cpu": other_cpu,
                "runs": runs,
            }
        )
    print(
        f"""(speedup: req/s over the 1-row's; ceiling: the same for N processes running the handler's loop,
 the most the cores allowed at the time; CPU bound: the most req/s the {cores} cores, less what others
 took, allow at this row's server + client CPU per request, over the 1-row's req/s; cpu_s: server
 CPU seconds in the window; server CPU: share of one core. Per request: server = the whole server
 process, handler = measured inside the handler, non-h. = server - handler, of which worker = the
 worker threads' own part (drain, dispatch, send) and I/O = the tokio threads; client = the load
 generator; others: other processes)"""
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "interpreter": describe_interpreter(),
                    "cost_us": args.cost_us,
                    "iterations": iterations,
                    "client": args.client,
                    "connections": args.connections,
                    "duration": args.duration,
                    "cores": cores,
                    "load_average": os.getloadavg(),
                    "rows": summary,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
