#!/usr/bin/env python3
"""Run the performance workload against WarpSocket and its peers; print markdown tables.

    python3 benchmarks/run.py                       # 6 servers x 1k/10k, closed loop, 3 rounds
    python3 benchmarks/run.py --servers warpsocket,socketify,wse-server --connections 1000 \\
        --open-loop --clients warpsocket-bench,picows --perf --json /tmp/r.json
    python3 benchmarks/chart.py /tmp/r.json docs/bench-open-loop.png
    python3 benchmarks/run.py --servers warpsocket,warpsocket+tls,socketify+tls

Rounds alternate the servers: round 1 runs each server once, then round 2, and so on,
so a change in the machine's load hits every server alike; each round rotates the
servers' order by one (a, b, c; then b, c, a; ...), so none always runs first or right
after another. The tables give the median (min–max) over the rounds. For each run:
start the server pinned to core 0 (``taskset -c 0``), wait until every port accepts, run
the load generator pinned to core 1, and measure the server from outside over exactly
the generator's measurement window (between the ``WINDOW_START`` and ``WINDOW_END`` it
prints, after connects and warm-up):

* CPU: utime + stime of the server process (all its threads) from ``/proc/PID/stat``,
  as µs per acknowledged request and acks per CPU-second; the generator's own CPU the
  same way. A run whose generator used >= 90 % of its core is marked "generator-bound":
  there the generator, not the server, set the rate.
* Frames per request: frames the clients received / acks, which must be what the
  workload delivers (11.0 with every connection in a full channel of 10: ten events and
  the ack) within 1 %. A run more than 1 % short is marked, left out of the medians, and
  makes the runner exit with 1 and say which runs: that server did not deliver every
  broadcast. One more than 1 % over is marked and kept (nothing is missing; the window's
  frames and acks drift apart when the rate changes within it).
* Peak RSS: ``VmHWM`` from ``/proc/PID/status`` just before the server is stopped.
* The host: CPU model (``lscpu``), cores, kernel, and the 1-minute load average before
  and after every run, printed and written to the JSON.
* With ``--perf``: syscalls (every ``syscalls:sys_enter_*`` tracepoint) and context
  switches per request, counted by ``perf stat`` over the window (harness/perfstat.py).

Loads: closed loop (each connection sends its next request when the previous one is
acknowledged: the saturated throughput), and with ``--open-loop`` fixed offered rates,
by default 25 %, 50 % and 90 % of socketify's saturated rate (the median of the closed
loop runs just before, same client and connection count; or ``--reference-rate``),
latency measured from each request's scheduled send time.

Clients (``--clients``, comma-separated, each runs everything): ``warpsocket-bench``
(crates/warpsocket-bench, Rust, one thread) and ``picows`` (benchmarks/clients/
picows_client.py, Python + uvloop, an independent implementation of the same workload).

Servers: warpsocket (``examples/performance/worker.py``, one worker thread; ``--threads
N`` for N, ``--threads default`` for the CLI's default), the peers
in benchmarks/peers (socketify, wse-server, picows, aiohttp, websockets) and
warpsocket-metrics (``--metrics`` on). A name with ``+tls`` (warpsocket, socketify) runs
that server over TLS with a test CA made by ``trustme``. wse-server needs Python >= 3.12:
``--wse-python`` (by default a venv ``.venv-wse`` made from a python3.12+ found on PATH
or under pyenv, with wse-server installed into it).

Connections are spread over ``--ports`` server ports (wse-server: one) and
``--source-ips`` client addresses 127.0.0.1..N, so 19,000 connections fit in a process
limit of 20,000 files and in the ephemeral ports. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import glob
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import perfstat, report  # noqa: E402
from harness.report import fmt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / "peers"
WORKER = ROOT / "examples" / "performance" / "worker.py"
BENCH_BIN = ROOT / "target" / "release" / "warpsocket-bench"
PICOWS_CLIENT = ROOT / "benchmarks" / "clients" / "picows_client.py"
CLIENTS = ["warpsocket-bench", "picows"]
ALL_SERVERS = ["warpsocket", "socketify", "wse-server", "picows", "aiohttp", "websockets"]
#: Servers that can run over TLS (as "NAME+tls").
TLS_SERVERS = ["warpsocket", "socketify"]
TLS_SUFFIX = "+tls"
# Not run by default: WarpSocket with --metrics on, to measure what the metrics cost.
OTHER_SERVERS = ["warpsocket-metrics"]
#: The server whose saturated rate the open-loop rates are fractions of.
REFERENCE = "socketify"
# server name -> (pip package, import name) for the peers run by this interpreter
PEER_PACKAGES = {
    "websockets": ("websockets", "websockets"),
    "aiohttp": ("aiohttp", "aiohttp"),
    "picows": ("picows", "picows"),
    "socketify": ("socketify", "socketify"),
}
WSE_VENV = ROOT / ".venv-wse"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Members of each channel in the workload (examples/performance/worker.py, the peers).
BUCKET_SIZE = 10
#: How far frames per request may be from the workload's before the run fails.
FRAMES_TOLERANCE = report.FRAMES_TOLERANCE
#: Generator CPU (% of its core over the window) from which it, not the server, is the limit.
GENERATOR_BOUND_PERCENT = 90.0


@dataclass
class Result:
    server: str
    connections: int
    run: int
    client: str = "warpsocket-bench"
    #: Open loop: offered requests/s, and that as a share of the reference rate.
    rate: float | None = None
    fraction: float | None = None
    figures: dict = field(default_factory=dict)
    server_cpu_s: float | None = None
    #: Of server_cpu_s, the kernel's part (stime: syscalls, loopback TCP charged to it).
    server_sys_s: float | None = None
    gen_cpu_s: float | None = None
    peak_rss_mib: float | None = None
    #: ``--perf``: event -> count over the window (syscall names, "context-switches").
    perf: dict = field(default_factory=dict)
    note: str = ""
    #: WarpSocket's worker threads (None: the CLI's default); the peers ignore it.
    threads: int | None = 1
    #: 1-minute load average just before the server started and just after it stopped.
    load_before: float | None = None
    load_after: float | None = None
    #: Frames the clients received per ack, and what the workload should give.
    frames_per_request: float | None = None
    expected_frames: float | None = None
    #: The generator used >= GENERATOR_BOUND_PERCENT of its core: it set the rate.
    generator_bound: bool = False
    host: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return report.ok(asdict(self))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_average() -> float:
    """The 1-minute load average."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def host_info() -> dict[str, str | int]:
    """The machine the figures come from: CPU model, cores, kernel, Python."""
    cpu = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        names = [ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name:")]
        cpu = names[0] if names else cpu
    except OSError:  # no lscpu: /proc/cpuinfo has the same name
        cpu = next(
            (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")),
            cpu,
        )  # fmt: skip
    return {
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def expected_frames_per_request(connections: int, bucket: int = BUCKET_SIZE) -> float:
    """Frames a request brings the clients: the ack plus one event per member of its channel.

    Connections fill channels ``bucket`` at a time, so a request from a channel of m
    members brings 1 + m frames, and channels of m members send m of every n requests.
    """
    if connections <= 0:
        return 0.0
    full, rest = divmod(connections, bucket)
    return 1 + (full * bucket * bucket + rest * rest) / connections


def check_frames(result: Result, expected: float | None, tolerance: float = FRAMES_TOLERANCE) -> None:
    """Record frames per request; mark the run when it is off the workload's by > tolerance."""
    acks = result.figures.get("acks", 0)
    if not acks:
        return
    result.frames_per_request = result.figures.get("frames_received", 0) / acks
    if expected is None:
        # The connections the generator got: a server that refused some has smaller channels.
        expected = expected_frames_per_request(result.figures.get("connections", result.connections))
    result.expected_frames = expected
    got = result.frames_per_request
    if abs(got - expected) > tolerance * expected:
        why = f"frames/request {got:.2f}, expected {expected:.2f} ± {100 * tolerance:g} %"
        result.note = (result.note + "; " + why).lstrip("; ")


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


def python312() -> str | None:
    """A Python >= 3.12 interpreter that runs: this one, one on PATH, or pyenv's."""
    if sys.version_info >= (3, 12):
        return sys.executable
    roots = [os.environ.get("PYENV_ROOT", ""), str(Path.home() / ".pyenv")]
    pyenv = [
        p for root in filter(None, roots) for p in sorted(glob.glob(f"{root}/versions/3.1[2-9]*/bin/python3"))
    ]
    on_path = [shutil.which(name) for name in ("python3.12", "python3.13", "python3.14")]
    for candidate in filter(None, [*on_path, *pyenv]):
        # pyenv's shims are on PATH but fail for versions that are not selected.
        probe = [candidate, "-c", "import sys; sys.exit(sys.version_info < (3, 12))"]
        if subprocess.run(probe, capture_output=True).returncode == 0:
            return candidate
    return None


def ensure_wse(python: str | None, install: bool) -> tuple[str | None, str]:
    """The interpreter that runs wse-server (made and filled if need be), or None and why."""
    if python is None:
        if (WSE_VENV / "bin" / "python").exists():
            python = str(WSE_VENV / "bin" / "python")
        elif install and (base := python312()):
            log(f"making {WSE_VENV} with {base} for wse-server")
            subprocess.run([base, "-m", "venv", str(WSE_VENV)], check=False)
            python = str(WSE_VENV / "bin" / "python")
            if not Path(python).exists():
                return None, f"could not make a venv for wse-server with {base}"
        else:
            return None, "wse-server needs Python >= 3.12: none found (--wse-python)"
    check = [python, "-c", "import wse_server"]
    if subprocess.run(check, capture_output=True).returncode != 0 and install:
        log(f"installing wse-server into {python}")
        subprocess.run([python, "-m", "pip", "install", "-q", "wse-server"], check=False)
    done = subprocess.run(check, capture_output=True, text=True)
    if done.returncode != 0:
        return None, (done.stderr.strip().splitlines() or ["import wse_server failed"])[-1][:200]
    return python, ""


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
    threads: int | None = 1,
    compression: bool = False,
    *,
    certs: Certs | None = None,
    wse_python: str | None = None,
) -> list[str]:
    pin = ["taskset", "-c", cpu]
    tls = ["--tls-cert", str(certs.chain), "--tls-key", str(certs.key)] if certs else []
    if server.startswith("warpsocket"):
        binds = [arg for p in ports for arg in ("--bind", f"127.0.0.1:{p}")]
        # The port after the server's, kept free for it by main().
        metrics = ["--metrics", f"127.0.0.1:{ports[-1] + 1}"] if server == "warpsocket-metrics" else []
        # threads None: the CLI's own default (max(cpu count, 4)).
        workers = ["--threads", str(threads)] if threads is not None else []
        return [
            *pin, sys.executable, "-m", "warpsocket", str(WORKER), *binds, *metrics,
            *workers, "--log-level", "WARNING", *tls,
            *(["--compression"] if compression else []),
        ]  # fmt: skip
    if compression:
        raise ValueError(f"--compression is only wired for warpsocket, not {server}")
    port_args = [arg for p in ports for arg in ("--port", str(p))]
    python = sys.executable
    if server == "wse-server":
        if wse_python is None:
            raise ValueError("wse-server needs its Python >= 3.12 interpreter")
        python = wse_python
    # Not wse_server.py: the script's folder comes first on sys.path and would shadow the package.
    script = PEERS / ("wse_peer.py" if server == "wse-server" else f"{server}_server.py")
    return [*pin, python, str(script), *port_args, *tls]


def client_command(
    client: str, ports: list[int], conns: int, rate: float | None, args: argparse.Namespace, tls: Certs | None
) -> list[str]:
    """The load generator's command line, pinned to the client CPU."""
    common = [
        *[a for p in ports for a in ("--port", str(p))],
        "--connections", str(conns), "--warmup", str(args.warmup), "--duration", str(args.duration),
        "--source-ips", str(args.source_ips), *(["--rate", f"{rate:.1f}"] if rate else []),
    ]  # fmt: skip
    pin = ["taskset", "-c", args.client_cpu]
    if client == "picows":
        if tls or args.compression:
            raise ValueError("the picows client speaks plain ws:// without compression only")
        return [*pin, sys.executable, str(PICOWS_CLIENT), *common]
    return [
        *pin, str(args.bench), *common,
        *(["--tls-ca", str(tls.ca)] if tls else []), *(["--compression"] if args.compression else []),
    ]  # fmt: skip


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


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` (or the wildcard) and nothing holds it bound."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(first: int, count: int) -> list[int]:
    """``count`` consecutive free ports from ``first`` on (skipping past ones in use)."""
    start = first
    while start + count < 65536:
        taken = [p for p in range(start, start + count) if not port_free(p)]
        if not taken:
            return list(range(start, start + count))
        start = taken[-1] + 1
    raise RuntimeError(f"no {count} free consecutive ports from {first}")


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on ``port`` on any IPv4/IPv6 address (/proc/net/tcp*)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is ADDR:PORT in hex; state 0A is LISTEN; field 9 the inode.
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process ``pid`` has open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def check_own_listeners(ports: list[int], pid: int) -> None:
    """Fail when a port is (also) listened on by another process than the server.

    A server that sets SO_REUSEPORT (socketify) shares a port with another process's
    listener, and one that fails to bind leaves the port to it: either way the generator
    would measure someone else (a concurrent benchmark on the same ports).
    """
    own = socket_inodes(pid)
    for port in ports:
        if listening_inodes(port) - own:
            raise RuntimeError(f"port {port} is also listened on by another process (a second benchmark?)")


def cpu_split(pid: int) -> tuple[float, float] | None:
    """User and system (kernel) CPU seconds of process ``pid``, all its threads."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # after "pid (comm)": fields[11] = utime, fields[12] = stime (man 5 proc, 14 and 15)
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid``."""
    split = cpu_split(pid)
    return None if split is None else split[0] + split[1]


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


def ports_for(server: str, first: int, args: argparse.Namespace) -> list[int]:
    """The ports a run of ``server`` listens on (wse-server: one, see its peer)."""
    return list(range(first, first + (1 if server == "wse-server" else args.ports)))


def run_one(result: Result, ports: list[int], args: argparse.Namespace, certs: Certs | None) -> Result:
    """Start the server, run the client against it, measure; fills in and returns ``result``."""
    server, conns = result.server, result.connections
    load = "closed loop" if result.rate is None else f"{result.rate:,.0f} requests/s"
    result.load_before = load_average()
    log(
        f"{server}: {conns} connections, {result.client}, {load}, round {result.run}, "
        f"ports {ports[0]}-{ports[-1]}, load average {result.load_before:.2f}"
    )
    name = f"{server}-{conns}-{result.client}-{result.rate or 'closed'}-{result.run}".replace(".", "_")
    server_log = open(args.log_dir / f"{name}.log", "w")  # noqa: SIM115
    base = server.removesuffix(TLS_SUFFIX)
    tls = certs if server.endswith(TLS_SUFFIX) else None
    proc = subprocess.Popen(
        server_command(base, ports, args.server_cpu, result.threads, compression=args.compression,
                       certs=tls, wse_python=args.wse_python),
        cwd=ROOT, stdout=server_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    perf: perfstat.PerfStat | None = None
    try:
        wait_listening(ports, proc)
        check_own_listeners(ports, proc.pid)
        if args.perf:
            perf = perfstat.PerfStat(proc.pid, args.log_dir, name)
        gen = subprocess.Popen(
            client_command(result.client, ports, conns, result.rate, args, tls),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        marks: dict[str, tuple[tuple[float, float] | None, float | None]] = {}
        stderr_lines: list[str] = []

        def read_stderr() -> None:
            assert gen.stderr is not None
            for line in gen.stderr:
                line = line.strip()
                if line in ("WINDOW_START", "WINDOW_END"):
                    marks[line] = (cpu_split(proc.pid), cpu_seconds(gen.pid))
                    if perf is not None and line == "WINDOW_START":
                        perf.enable()
                    elif perf is not None:
                        perf.disable()
                else:
                    stderr_lines.append(line)

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        killer = threading.Timer(args.warmup + args.duration + 180, gen.kill)
        killer.start()
        assert gen.stdout is not None
        out = gen.stdout.read()
        # Not reaped before the reader has sampled its CPU at WINDOW_END: it exits right after.
        reader.join(timeout=60)
        gen.wait()
        if not killer.is_alive():
            result.note = "load generator timed out"
        killer.cancel()
        result.peak_rss_mib = peak_rss_mib(proc.pid)
        for line in out.splitlines():
            if line.startswith("{"):
                result.figures = json.loads(line)
        if "WINDOW_START" in marks and "WINDOW_END" in marks:
            (s0, g0), (s1, g1) = marks["WINDOW_START"], marks["WINDOW_END"]
            if s0 is not None and s1 is not None:
                result.server_cpu_s = sum(s1) - sum(s0)
                result.server_sys_s = s1[1] - s0[1]
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
        if perf is not None:
            result.perf = perf.close()
        stop(proc)
        server_log.close()
        result.load_after = load_average()
    check_frames(result, args.expect_frames)
    f = result.figures
    raw = asdict(result)
    gen_percent = report.percent_of_window(raw, result.gen_cpu_s)
    if gen_percent is not None and gen_percent >= GENERATOR_BOUND_PERCENT:
        result.generator_bound = True
        result.note = (result.note + "; generator-bound").lstrip("; ")
    log(
        f"  -> acks/s {fmt(f.get('acks_per_s'))}, sent/s {fmt(f.get('sent_per_s'))}, "
        f"frames/request {fmt(result.frames_per_request, 2)}, "
        f"p50 {f.get('p50_ms')} ms, p99 {f.get('p99_ms')} ms, "
        f"server CPU {fmt(report.cpu_us_per_request(raw), 1)} µs/request "
        f"({fmt(report.kernel_percent(raw))} % kernel), "
        f"generator CPU {fmt(gen_percent)} %, RSS {fmt(result.peak_rss_mib)} MiB, "
        f"load average after {result.load_after:.2f} {result.note}"
    )
    return result


def fractions(spec: str) -> list[float]:
    """``0.25,0.5,0.9`` -> the open-loop loads as shares of the reference rate."""
    values = [float(v) for v in spec.split(",") if v.strip()]
    if not values or any(not 0 < v <= 2 for v in values):
        raise argparse.ArgumentTypeError("expected shares such as 0.25,0.5,0.9")
    return values


def threads_arg(value: str) -> int | None:
    """``--threads``: a positive count, or ``default`` (None: the CLI's own default)."""
    if value == "default":
        return None
    count = int(value)
    if count < 1:
        raise argparse.ArgumentTypeError("expected a positive number or 'default'")
    return count


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help=f"comma-separated; {TLS_SUFFIX!r} after one of {TLS_SERVERS} runs it over TLS",
    )
    parser.add_argument("--clients", default=CLIENTS[0], help=f"comma-separated, of {CLIENTS}")
    parser.add_argument("--connections", default="1000,10000", help="comma-separated counts")
    parser.add_argument("--repeat", type=int, default=3, help="rounds")
    parser.add_argument("--duration", type=float, default=10.0, help="measurement window, seconds")
    parser.add_argument(
        "--warmup",
        type=float,
        default=8.0,
        help="seconds of load before the window (10,000 connections need ~8 s to settle)",
    )
    parser.add_argument(
        "--open-loop",
        type=fractions,
        nargs="?",
        const=fractions("0.25,0.5,0.9"),
        metavar="SHARES",
        help="also run open loop at these shares of the reference rate (default 0.25,0.5,0.9)",
    )
    parser.add_argument(
        "--reference-rate",
        type=float,
        help=f"requests/s the open-loop shares are of (default: {REFERENCE}'s closed-loop median)",
    )
    parser.add_argument("--no-closed", action="store_true", help="open loop only (needs --reference-rate)")
    parser.add_argument("--perf", action="store_true", help="count syscalls and context switches (perf stat)")
    parser.add_argument("--ports", type=int, default=4, help="server ports per run")
    parser.add_argument("--base-port", type=int, default=21000)
    parser.add_argument("--source-ips", type=int, default=8, help="client source IPs 127.0.0.1..N")
    parser.add_argument("--server-cpu", default="0", help="taskset CPU list for the server")
    parser.add_argument("--client-cpu", default="1", help="taskset CPU list for the generator")
    parser.add_argument("--bench", type=Path, default=BENCH_BIN, help="warpsocket-bench binary")
    parser.add_argument("--wse-python", help="a Python >= 3.12 with wse-server (default: .venv-wse)")
    parser.add_argument("--no-install", action="store_true", help="do not pip/apt install peers")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/warpsocket-bench-logs"))
    parser.add_argument("--json", type=Path, help="also write the raw results here (for chart.py)")
    parser.add_argument(
        "--compression",
        action="store_true",
        help="warpsocket with --compression, clients offering permessage-deflate",
    )
    parser.add_argument(
        "--threads",
        type=threads_arg,
        default=1,
        help="WarpSocket's worker threads: a number, or 'default' for the CLI's default (default 1)",
    )
    parser.add_argument(
        "--expect-frames",
        type=float,
        metavar="N",
        help="frames per request every run must show (default: 11.0 with full channels of 10, "
        "less with a partial last channel); a run off by more than 1 %% fails",
    )
    args = parser.parse_args()

    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    known = ALL_SERVERS + OTHER_SERVERS + [s + TLS_SUFFIX for s in TLS_SERVERS]
    unknown = [s for s in servers if s not in known]
    if unknown:
        parser.error(f"unknown servers {unknown}; choose from {known}")
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if bad := [c for c in clients if c not in CLIENTS]:
        parser.error(f"unknown clients {bad}; choose from {CLIENTS}")
    if args.no_closed and not (args.open_loop and args.reference_rate):
        parser.error("--no-closed needs --open-loop and --reference-rate")
    if args.perf and (why := perfstat.available()):
        parser.error(f"--perf: perf stat cannot count syscalls here: {why}")
    counts = [int(c) for c in args.connections.split(",")]
    args.log_dir.mkdir(parents=True, exist_ok=True)
    raise_fd_limit(max(counts) + 100)
    if "warpsocket-bench" in clients:
        ensure_bench_binary(args.bench)
    bases = list(dict.fromkeys(s.removesuffix(TLS_SUFFIX) for s in servers))
    missing = ensure_peers(bases + (["picows"] if "picows" in clients else []), install=not args.no_install)
    if "picows" in clients and "picows" in missing:
        parser.error(f"the picows client cannot run: {missing['picows']}")
    if "wse-server" in servers:
        args.wse_python, why = ensure_wse(args.wse_python, install=not args.no_install)
        if why:
            missing["wse-server"] = why
    unavailable = {s: missing[base] for s in servers if (base := s.removesuffix(TLS_SUFFIX)) in missing}
    for s, why in unavailable.items():
        log(f"skipping {s}: {why}")
    certs = make_certs(args.log_dir) if any(s.endswith(TLS_SUFFIX) for s in servers) else None

    started = time.time()
    load_at_start = load_average()
    host = host_info()
    log(f"host: {host['cpu']}, {host['cores']} cores, kernel {host['kernel']}, load {load_at_start:.2f}")
    results: list[Result] = []
    next_port = args.base_port

    def rounds(client: str, conns: int, loads: list[tuple[float | None, float | None]]) -> None:
        """``--repeat`` rounds; in each, every load (rate, share) for every server in turn."""
        nonlocal next_port
        for run in range(1, args.repeat + 1):
            # Rotated each round: no server always runs first, or right after the same one.
            shift = (run - 1) % len(servers)
            order = servers[shift:] + servers[:shift]
            for rate, share in loads:
                for server in order:
                    result = Result(server, conns, run, client, rate, share, threads=args.threads, host=host)
                    if server in unavailable:
                        result.note = f"not run: {unavailable[server]}"
                        results.append(result)
                        continue
                    # Fresh ports every run: no TIME_WAIT leftovers from the previous one;
                    # one more for warpsocket-metrics' metrics address. Those another
                    # process listens on (a second benchmark) are skipped.
                    block = free_ports(next_port, args.ports + 1)
                    ports = ports_for(server, block[0], args)
                    next_port = block[-1] + 1
                    results.append(run_one(result, ports, args, certs))
                    time.sleep(1.0)

    for conns in counts:
        for client in clients:
            if not args.no_closed:
                rounds(client, conns, [(None, None)])
            if not args.open_loop:
                continue
            reference = args.reference_rate
            if reference is None:
                closed = (REFERENCE, client, conns, None)
                saturated = [
                    r.figures["acks_per_s"] for r in results
                    if (r.server, r.client, r.connections, r.rate) == closed and r.ok
                ]  # fmt: skip
                if not saturated:
                    log(f"no open loop for {client} at {conns}: no closed-loop {REFERENCE} figure to scale")
                    continue
                reference = statistics.median(saturated)
            rounds(client, conns, [(share * reference, share) for share in args.open_loop])

    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    workers = "the CLI's default" if args.threads is None else str(args.threads)
    print(f"\n{when}, {host['cores']} cores ({host['cpu']}), kernel {host['kernel']}, "
          f"Python {host['python']}, WarpSocket worker threads {workers}, "
          f"window {args.duration:g} s after {args.warmup:g} s warm-up, "
          f"total {time.time() - started:.0f} s, load average at the start {load_at_start:.2f}, "
          f"at the end {load_average():.2f}\n")  # fmt: skip
    raw = [asdict(r) for r in results]
    print(report.every_run(raw))
    print("\nMedian (min–max) of the rounds (runs short of frames per request left out):\n")
    print(report.medians(raw))
    if args.perf:
        print("\nSyscalls and context switches per request (perf stat over the window), medians:\n")
        print(report.syscalls(raw))
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    ran = [r for r in results if r.server not in unavailable]
    if bound := [r for r in ran if r.generator_bound]:
        log(f"{len(bound)} of {len(ran)} runs were generator-bound (generator >= "
            f"{GENERATOR_BOUND_PERCENT:g} % of its core): their rates measure the generator")  # fmt: skip
    for r in ran:
        if report.frames_over(asdict(r)):
            log(f"note: {r.server}, {r.connections} connections, {report.load(asdict(r))}, round {r.run}: "
                f"{r.frames_per_request:.2f} frames per request, above {r.expected_frames:.2f} + "
                f"{100 * FRAMES_TOLERANCE:g} %: the window's frames and acks drifted apart")  # fmt: skip
    if short := [r for r in ran if report.frames_short(asdict(r))]:
        for r in short:
            log(f"FAILED: {r.server}, {r.connections} connections, {report.load(asdict(r))}, round {r.run}: "
                f"{r.frames_per_request:.2f} frames per request, expected {r.expected_frames:.2f} ± "
                f"{100 * FRAMES_TOLERANCE:g} %: it did not deliver every broadcast")  # fmt: skip
        return 1
    return 0 if all(r.ok for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
