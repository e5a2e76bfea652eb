#!/usr/bin/env python3
"""Recovery storm (issue 25): kill one of two cluster nodes under load; its clients recover.

    python3 benchmarks/recovery_storm.py                      # 2,000 clients, 3 runs
    python3 benchmarks/recovery_storm.py --clients 200 --channels 5 --rate 200 --runs 1

Each run starts ``redis-server`` and two WarpSocket nodes (``--cluster``, every channel a
history channel: ``--history '=SIZE/300'``, stamps on) running
``benchmarks/recovery_storm_worker.py``. Then:

1. ``--clients`` WebSocket clients (the ``websockets`` package, asyncio, spread over
   ``--procs`` generator processes), half on each node, client i in channel
   ``storm:{i % channels}``, each joins its channel with ``rec CH - -`` (``recover`` from
   ``position(CH)``), so it must then see every offset after that one;
2. a publisher sends ``--rate`` messages/s in all through both nodes (one connection to each;
   ``pub CH DATA``, round-robin over the channels);
3. after ``--before`` seconds node A is SIGKILLed. Its clients (and its publisher) see the
   connection drop, connect to node B and send ``rec CH EPOCH LAST`` with the last offset
   they saw; the worker answers with what ``recover`` returned and how long it took;
4. ``--after`` seconds later the publisher stops; the script reads every channel's final
   ``position`` on node B and every client waits until it has seen that offset.

Every client checks each stamped delivery: its offset is the one after the last it saw
(a smaller one is a duplicate, a larger one a gap), before and after the kill. The run
passes when every recover returned True, no client saw a gap or a duplicate or missed the
tail, and every moved client had its answer within ``--deadline`` seconds of the kill.
Reported: the recover calls' time in the worker (p50, p99, max), kill → recovered (p50,
p99, max), deliveries, and the CPU seconds of every process over the storm (the
generators' own CPU shows when they, not the servers, were the limit).

Prints a line per run, then medians (min–max) over the runs, and with ``--json PATH``
writes the runs' figures there. Exit status 0 when every run passed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "recovery_storm_worker.py"
sys.path.insert(0, str(HERE))
from cluster import Redis, free_port  # noqa: E402 - the cluster benchmark's Redis helper

log = logging.getLogger("recovery_storm")

#: How long a client may take to be back (connected to node B and recovered) before the
#: run gives up on it; the pass/fail deadline is ``--deadline``.
RECONNECT_GIVE_UP_S = 30.0
#: How long the clients may take to see every channel's last offset after the flow stops.
TAIL_TIMEOUT_S = 30.0


# --- one client -------------------------------------------------------------------------


@dataclass
class ClientResult:
    """What one client saw; every count must be 0 and every recover True."""

    index: int
    home: int  # 0: node A (killed), 1: node B
    received: int = 0
    gaps: int = 0  # offsets skipped
    duplicates: int = 0  # offsets seen again (or going back)
    recovers: list[str] = field(default_factory=list)  # "1", "0" or "E" per recover call
    recover_us: float | None = None  # the recover after the kill, in the worker
    back_at: float | None = None  # time.monotonic() when that recover's answer arrived
    last: int = 0
    tail_missing: int = 0
    #: Where it was when the run ended: joining, live, connecting, awaiting (a recover's answer).
    phase: str = "joining"
    error: str = ""
    retries: int = 0  # handshakes that failed and were tried again


class StormClient:
    """One subscriber: joins its channel, checks every offset, moves to node B when A dies."""

    def __init__(self, index: int, channel: str, ports: list[int], home: int) -> None:
        self.channel, self.ports = channel, ports
        self.result = ClientResult(index, home)
        self.epoch = ""
        self.last: int | None = None  # None until the first recover's answer says SINCE
        self.awaiting = False  # a recover was asked for and its answer has not come
        self.pending: list[int] = []  # offsets seen while awaiting it
        self.joined = asyncio.get_running_loop().create_future()
        self.caught_up = asyncio.Event()
        self.final: int | None = None

    async def run(self, stop: asyncio.Event) -> None:
        port = self.ports[self.result.home]
        request = f"rec {self.channel} - -"
        while True:
            self.result.phase = "connecting"
            try:
                ws = await self.connect(port)
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                self.fail(f"connect to {port}: {exc!r}")
                return
            try:
                self.awaiting, self.result.phase = True, "awaiting"
                await ws.send(request)
                async for message in ws:
                    self.on_message(message)
            except ConnectionClosed:
                pass
            finally:
                await ws.close()
            if stop.is_set() or port == self.ports[1]:
                if not stop.is_set():
                    self.fail("node B closed the connection")
                return
            # Node A died: to node B, recovering from the last offset seen.
            port = self.ports[1]
            request = f"rec {self.channel} {self.epoch} {self.last if self.last is not None else 0}"

    async def connect(self, port: int) -> ClientConnection:
        """Connect, retrying as a real client would (with jitter) until RECONNECT_GIVE_UP_S.

        A node holds at most ``max_pending_upgrades`` (1024) handshakes at once; beyond
        that a newcomer takes the slot of the oldest one of the busiest address (every
        client here is 127.0.0.1), which the server closes: a storm of more reconnects
        than that at once needs retries.
        """
        deadline = time.monotonic() + RECONNECT_GIVE_UP_S
        while True:
            try:
                return await connect(
                    f"ws://127.0.0.1:{port}/", open_timeout=30, ping_interval=None, max_queue=None
                )
            except (OSError, TimeoutError, InvalidHandshake):
                if time.monotonic() > deadline:
                    raise
                self.result.retries += 1
                await asyncio.sleep(random.uniform(0.05, 0.25))

    def fail(self, why: str) -> None:
        self.result.error = self.result.error or why
        if not self.joined.done():
            self.joined.set_result(None)
        self.caught_up.set()

    def on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self.fail("a binary message")
            return
        if message.startswith("!rec "):
            self.on_recovered(message)
            return
        head, sep, _ = message.partition(":")
        if not sep or not head.isdigit():
            self.fail(f"not stamped: {message[:60]!r}")
            return
        self.result.received += 1
        if self.awaiting:
            self.pending.append(int(head))
        else:
            self.check(int(head))

    def check(self, offset: int) -> None:
        assert self.last is not None
        if offset <= self.last:
            self.result.duplicates += 1
            return
        self.result.gaps += offset - self.last - 1
        self.last = offset
        if self.final is not None and self.last >= self.final:
            self.caught_up.set()

    def on_recovered(self, message: str) -> None:
        _, _, ok, since, took_us, epoch = message.split(" ", 5)
        first = not self.result.recovers
        self.awaiting, self.result.phase = False, "live"
        self.result.recovers.append(ok)
        if not first:
            self.result.recover_us = float(took_us)
            self.result.back_at = time.monotonic()
        if ok == "1":
            if first:
                self.epoch = epoch
            self.last = int(since)
        elif first or ok == "E":
            self.fail(f"recover answered {message!r}")
            return
        else:
            # False: nothing was replayed; count it (above) and go on from what comes next.
            self.last = self.pending[0] - 1 if self.pending else self.last
        pending, self.pending = self.pending, []
        for offset in pending:
            self.check(offset)
        if first and not self.joined.done():
            self.joined.set_result(None)

    def expect(self, final: int) -> None:
        self.final = final
        if self.result.error or (self.last is not None and self.last >= final):
            self.caught_up.set()


async def generator_main(
    conn: multiprocessing.connection.Connection, indexes: list[int], channels: int, ports: list[int]
) -> None:
    """One generator process: its clients, driven by the parent through ``conn``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    clients = [StormClient(i, f"storm:{i % channels}", ports, i % 2) for i in indexes]
    gate = asyncio.Semaphore(64)  # connects in flight: the servers' accept queues stay short

    async def start(client: StormClient) -> None:
        async with gate:
            task = asyncio.create_task(client.run(stop))
            tasks.append(task)
            await asyncio.wait([client.joined, task], return_when=asyncio.FIRST_COMPLETED)

    tasks: list[asyncio.Task] = []
    await asyncio.gather(*(start(c) for c in clients))
    conn.send(("ready", sum(1 for c in clients if not c.result.error)))
    finals: dict[str, int] = await loop.run_in_executor(None, conn.recv)
    for c in clients:
        c.expect(finals[c.channel])
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(c.caught_up.wait() for c in clients)), TAIL_TIMEOUT_S)
    stop.set()
    for c in clients:
        if c.last is not None and c.final is not None and c.last < c.final:
            c.result.tail_missing = c.final - c.last
        c.result.last = c.last or 0
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    conn.send(([asdict(c.result) for c in clients], usage.ru_utime + usage.ru_stime))


def generator_process(conn, indexes, channels, ports) -> None:  # noqa: ANN001 - spawn target
    """Entry point of a generator process."""
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(generator_main(conn, indexes, channels, ports))


# --- the publisher ----------------------------------------------------------------------


class Publisher:
    """``rate`` messages/s in all, through one connection to each node, round-robin channels."""

    def __init__(self, ports: list[int], channels: int, rate: float) -> None:
        self.ports, self.channels, self.rate = ports, channels, rate
        self.sent = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        await asyncio.gather(*(self.lane(i) for i in range(len(self.ports))))

    async def lane(self, lane: int) -> None:
        tick = 0.01
        per_tick = self.rate / len(self.ports) * tick
        port, owed, seq = self.ports[lane], 0.0, 0
        ws = await connect(f"ws://127.0.0.1:{port}/", ping_interval=None)
        next_at = time.monotonic()
        while not self.stop.is_set():
            owed += per_tick
            try:
                while owed >= 1:
                    channel = f"storm:{(seq * len(self.ports) + lane) % self.channels}"
                    await ws.send(f"pub {channel} p{lane}-{seq}")
                    seq += 1
                    owed -= 1
                    self.sent += 1
            except ConnectionClosed:
                # Node A died: go on through node B.
                port = self.ports[-1]
                ws = await connect(f"ws://127.0.0.1:{port}/", ping_interval=None, open_timeout=30)
            next_at += tick
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await ws.close()


# --- one run ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (``/proc/PID/stat``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"node on port {port} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"node on port {port} is not listening after {timeout:g} s")


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


async def final_positions(port: int, channels: int) -> dict[str, int]:
    async with connect(f"ws://127.0.0.1:{port}/", open_timeout=30) as ws:
        finals = {}
        for i in range(channels):
            await ws.send(f"pos storm:{i}")
            _, channel, offset, _ = (await asyncio.wait_for(ws.recv(), 30)).split(" ", 3)
            finals[channel] = int(offset)
        return finals


def run_once(run: int, args: argparse.Namespace) -> dict:
    """One storm: start everything, kill node A, check the clients; the run's figures."""
    log.info("run %d: %d clients, %d channels, %g messages/s", run, args.clients, args.channels, args.rate)
    log_path = args.log_dir / f"recovery-storm-{run}.log"
    with open(log_path, "w") as log_file:
        redis = Redis(args.server_cpu, log_file)
        ports = [free_port(), free_port()]
        nodes = [
            subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    args.server_cpu,
                    sys.executable,
                    "-m",
                    "warpsocket",
                    str(WORKER),
                    "--bind",
                    f"127.0.0.1:{port}",
                    "--threads",
                    str(args.threads),
                    "--cluster",
                    redis.url,
                    "--history",
                    f"={args.history_size}/300",
                    "--log-level",
                    "WARNING",
                ],
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            for port in ports
        ]
        ctx = multiprocessing.get_context("spawn")
        procs: list[tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]] = []
        try:
            for node, port in zip(nodes, ports, strict=True):
                wait_listening(port, node)
            for p in range(args.procs):
                mine, theirs = ctx.Pipe()
                # Pairs of clients (one per node) go round-robin over the processes.
                indexes = [i for i in range(args.clients) if (i // 2) % args.procs == p]
                proc = ctx.Process(
                    target=generator_process, args=(theirs, indexes, args.channels, ports), daemon=True
                )
                proc.start()
                procs.append((proc, mine))
            return asyncio.run(storm(run, args, redis, nodes, ports, procs))
        finally:
            for proc, _ in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
            for node in nodes:
                if node.poll() is None:
                    node.send_signal(signal.SIGINT)
                    try:
                        node.wait(20)
                    except subprocess.TimeoutExpired:
                        node.kill()
                        node.wait()
            redis.proc.kill()
            redis.proc.wait()


async def storm(
    run: int, args: argparse.Namespace, redis: Redis, nodes: list[subprocess.Popen], ports: list[int],
    procs: list,
) -> dict:  # fmt: skip
    loop = asyncio.get_running_loop()

    async def recv(conn: multiprocessing.connection.Connection, timeout: float):  # noqa: ANN202
        if not await loop.run_in_executor(None, conn.poll, timeout):
            raise TimeoutError("a generator process did not answer")
        return conn.recv()

    joined = 0
    for _, conn in procs:
        _, ok = await recv(conn, 300)
        joined += ok
    if joined != args.clients:
        raise RuntimeError(f"only {joined} of {args.clients} clients joined")
    log.info("  %d clients joined; the flow starts", joined)
    publisher = Publisher(ports, args.channels, args.rate)
    flow = asyncio.create_task(publisher.run())
    await asyncio.sleep(args.before)
    watched = {"node B": nodes[1].pid, "redis": redis.proc.pid} | {
        f"generator {i}": proc.pid for i, (proc, _) in enumerate(procs)
    }
    cpu0 = {name: cpu_seconds(pid) for name, pid in watched.items()}
    parent0 = resource.getrusage(resource.RUSAGE_SELF)
    sent_before = publisher.sent
    killed_at = time.monotonic()
    nodes[0].send_signal(signal.SIGKILL)
    nodes[0].wait()
    await asyncio.sleep(args.after)
    publisher.stop.set()
    await flow
    window = time.monotonic() - killed_at
    cpu1 = {name: cpu_seconds(pid) for name, pid in watched.items()}
    parent1 = resource.getrusage(resource.RUSAGE_SELF)
    finals = await final_positions(ports[1], args.channels)
    for _, conn in procs:
        conn.send(finals)
    clients: list[dict] = []
    for _, conn in procs:
        results, _ = await recv(conn, TAIL_TIMEOUT_S + 60)
        clients.extend(results)
    cpu = {
        name: round(cpu1[name] - cpu0[name], 2)
        for name in watched
        if cpu0[name] is not None and cpu1[name] is not None
    }
    cpu["publisher + script"] = round(
        parent1.ru_utime + parent1.ru_stime - parent0.ru_utime - parent0.ru_stime, 2
    )
    moved = [c for c in clients if c["home"] == 0]
    recovers = [c["recovers"][-1] for c in moved if len(c["recovers"]) >= 2]
    took_ms = [c["recover_us"] / 1000 for c in moved if c["recover_us"] is not None]
    back_s = [c["back_at"] - killed_at for c in moved if c["back_at"] is not None]
    true = sum(1 for r in recovers if r == "1")
    outcome = {
        "run": run,
        "clients": len(clients),
        "moved": len(moved),
        "recovered_true": true,
        "recovered_false": sum(1 for r in recovers if r == "0"),
        "recover_errors": sum(1 for r in recovers if r == "E"),
        "not_back": len(moved) - len(recovers),
        "gaps": sum(c["gaps"] for c in clients),
        "duplicates": sum(c["duplicates"] for c in clients),
        "tail_missing": sum(c["tail_missing"] for c in clients),
        "client_errors": [c["error"] for c in clients if c["error"]][:5],
        "phases": {
            phase: sum(1 for c in clients if c["phase"] == phase)
            for phase in sorted({c["phase"] for c in clients})
        },
        "deliveries": sum(c["received"] for c in clients),
        "handshake_retries": sum(c["retries"] for c in clients),
        "published": publisher.sent,
        "published_after_kill": publisher.sent - sent_before,
        "last_offsets_sum": sum(finals.values()),
        "recover_ms_p50": pct(took_ms, 50),
        "recover_ms_p99": pct(took_ms, 99),
        "recover_ms_max": max(took_ms, default=None),
        "back_s_p50": pct(back_s, 50),
        "back_s_p99": pct(back_s, 99),
        "back_s_max": max(back_s, default=None),
        "window_s": round(window, 2),
        "cpu_s": cpu,
    }
    outcome["passed"] = bool(
        moved
        and true == len(moved)
        and not outcome["gaps"]
        and not outcome["duplicates"]
        and not outcome["tail_missing"]
        and not outcome["client_errors"]
        and outcome["back_s_max"] is not None
        and outcome["back_s_max"] <= args.deadline
    )
    return outcome


# --- main -------------------------------------------------------------------------------


def spread(values: list[float | None], digits: int) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "–"
    f = f"{{:,.{digits}f}}"
    med = f.format(statistics.median(got))
    return med if len(got) == 1 else f"{med} ({f.format(min(got))}–{f.format(max(got))})"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1000.0, help="messages/s sent, in all")
    parser.add_argument("--before", type=float, default=5.0, help="seconds of flow before the kill")
    parser.add_argument("--after", type=float, default=10.0, help="seconds of flow after the kill")
    parser.add_argument("--deadline", type=float, default=5.0, help="kill -> recovered, seconds")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--procs", type=int, default=2, help="generator processes")
    parser.add_argument("--threads", type=int, default=2, help="worker threads per node")
    parser.add_argument("--history-size", type=int, default=1000, help="messages kept per channel")
    parser.add_argument("--server-cpu", default=f"0-{(os.cpu_count() or 1) - 1}", help="taskset CPU list")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/warpsocket-bench-logs"))
    parser.add_argument("--json", type=Path, help="write the runs' figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        parser.error("needs redis-server and redis-cli (apt-get install redis-server)")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.clients * 2 + 1024)), hard))

    outcomes = []
    for run in range(1, args.runs + 1):
        try:
            outcome = run_once(run, args)
        except Exception as exc:  # noqa: BLE001 - record it and go on with the next run
            log.exception("run %d failed", run)
            outcome = {"run": run, "passed": False, "error": repr(exc)[:300]}
        log.info("  -> %s", json.dumps(outcome))
        outcomes.append(outcome)

    ok = [o for o in outcomes if "error" not in o]
    print(f"\n{len(outcomes)} runs: {args.clients:,} clients in {args.channels} channels, "
          f"{args.rate:g} messages/s, node A killed after {args.before:g} s\n")  # fmt: skip
    print("| run | passed | recovered True | gaps / duplicates / tail missing | recover ms p50 / p99 / max "
          "| kill → recovered s p50 / p99 / max | deliveries | CPU s over the storm |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for o in ok:
        cpu = ", ".join(f"{k} {v}" for k, v in o["cpu_s"].items())
        print(f"| {o['run']} | {o['passed']} | {o['recovered_true']:,} / {o['moved']:,} "
              f"| {o['gaps']} / {o['duplicates']} / {o['tail_missing']} "
              f"| {spread([o['recover_ms_p50']], 1)} / {spread([o['recover_ms_p99']], 1)} / "
              f"{spread([o['recover_ms_max']], 1)} | {spread([o['back_s_p50']], 2)} / "
              f"{spread([o['back_s_p99']], 2)} / {spread([o['back_s_max']], 2)} "
              f"| {o['deliveries']:,} | {cpu} |")  # fmt: skip
    if ok:
        print("\nMedian (min–max) over the runs:\n")
        for key, digits in (("recover_ms_p50", 1), ("recover_ms_p99", 1), ("recover_ms_max", 1),
                            ("back_s_p50", 2), ("back_s_p99", 2), ("back_s_max", 2)):  # fmt: skip
            print(f"- {key}: {spread([o[key] for o in ok], digits)}")
    if args.json:
        args.json.write_text(json.dumps(outcomes, indent=1))
    return 0 if outcomes and all(o["passed"] for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
