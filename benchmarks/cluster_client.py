#!/usr/bin/env python3
"""``warpsocket.Cluster`` sending from a process that is no node (issue 27's targets).

    python3 benchmarks/cluster_client.py                       # 3 rounds, plain and history
    python3 benchmarks/cluster_client.py --messages 2000 --paced 200 --rounds 1   # a smoke run

One ``redis-server``, one WarpSocket node (``python -m warpsocket WORKER --cluster URL
--bind 127.0.0.1:0 --threads 1``) and one receiver process, a client of the node
subscribed to ``bench`` (plain) and ``hist:bench`` (a history channel, ``--history
hist:=100/300`` on the node and the same ``history`` on the ``Cluster``). This process
sends through one ``warpsocket.Cluster`` from its main thread. Each message is
``KIND SEQ TIME_NS`` (``time.time_ns()`` when ``send`` was called, one host so one clock),
padded to ``--size`` bytes.

Per round, for each channel (the order flips every round so a drift of the shared
machine's load hits every case alike):

* **throughput**: ``--messages`` sends as fast as one Python thread calls ``send``;
  then an end marker, retried until ``send`` takes it. The rate counts only messages the
  receiver got, from the first ``send`` to the last arrival (``time.time_ns`` in both
  processes). ``send`` returning 0 (the client's 65,536-message queue full) is counted
  as refused; the receiver checks sequence numbers, so a lost or reordered message shows.
* **retrying**: the same, but a send refused by the full queue is sent again after 1 ms,
  as an application that must not lose a message would: every message arrives, and the
  rate is what the whole path sustains;
* **latency**: ``--paced`` sends at ``--rate`` per second on schedule; each arrival's
  ``receive time_ns - send time_ns``.

Over each throughput window it reads the CPU time of every process (``/proc/PID/stat``),
of this process's two threads (the Python sender and the ``Cluster``'s Redis thread,
``/proc/self/task``) and Redis ``INFO commandstats`` (``PUBLISH``/``EVALSHA`` calls and
their microseconds), to tell which of Python, the client's Redis thread, Redis, the node
or the receiver is the limit.

The receiver is a plain-socket WebSocket client (handshake and unmasked server frames
parsed by hand, no compression offered, pings answered): ``--receiver websockets`` uses
the ``websockets`` asyncio client instead, whose per-message cost (~4x) makes the
receiver the limit. Results are logged to stderr; the
summary is a table of medians with min-max over the rounds; ``--json`` writes every
round's figures.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import Redis  # noqa: E402 - redis-server started as the cluster benchmark starts it

log = logging.getLogger("cluster_client")

PLAIN = "bench"
HISTORY_CHANNEL = "hist:bench"
HISTORY_RULE = "hist:=100/300"

WORKER = """
import warpsocket


def handle_text_message(text, socket_id):
    if text.startswith("sub "):
        for channel in text[4:].split():
            warpsocket.subscribe(socket_id, channel)
        warpsocket.send(socket_id, "subscribed")
"""

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# the receiver (a separate process: ``cluster_client.py receive PORT CHANNEL...``)
# --------------------------------------------------------------------------


class Frames:
    """Server frames from a plain socket: a WebSocket client without a library."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the node closed the connection during the handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"handshake refused: {head[:80]!r}")
        self.sock.settimeout(None)

    def send_frame(self, opcode: int, data: bytes) -> None:
        """One masked frame (a client must mask; payloads under 126 bytes only)."""
        assert len(data) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(bytes([0x80 | opcode, 0x80 | len(data)]) + mask + masked)

    def send_text(self, text: str) -> None:
        """One text frame."""
        self.send_frame(0x1, text.encode())

    def messages(self):
        """Yield each data frame's payload (bytes) until the connection closes."""
        buf = self.buf
        pos = 0
        recv = self.sock.recv
        while True:
            # Parse every complete frame in the buffer, then read more.
            while True:
                if len(buf) - pos < 2:
                    break
                opcode = buf[pos] & 0x0F
                length = buf[pos + 1] & 0x7F
                start = pos + 2
                if length == 126:
                    if len(buf) - pos < 4:
                        break
                    length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                    start = pos + 4
                elif length == 127:
                    if len(buf) - pos < 10:
                        break
                    length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                    start = pos + 10
                end = start + length
                if end > len(buf):
                    break
                if opcode == 0x8:
                    code = int.from_bytes(buf[start : start + 2], "big") if length >= 2 else None
                    log.warning("receiver: the node closed the connection (%s)", code)
                    return
                if opcode == 0x9:
                    # The node's keepalive: unanswered, it closes with 1011 after ping_timeout.
                    self.send_frame(0xA, bytes(buf[start:end]))
                if opcode in (0x1, 0x2):
                    yield buf[start:end]
                pos = end
            chunk = recv(1 << 20)
            if not chunk:
                return
            buf = buf[pos:] + chunk
            pos = 0


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``, which must not be empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


class Tally:
    """The receiver's counts for the current phase, reported to stdout at its end marker."""

    def __init__(self) -> None:
        self.subscribed = False
        self.reset()

    def reset(self) -> None:
        """Start the next phase."""
        self.count = self.first_ns = self.last_ns = self.expected = self.gaps = self.backwards = 0
        self.latencies: list[int] = []

    def feed(self, payload: bytes) -> None:
        """Count one message (``KIND SEQ TIME_NS``, or the node's ``subscribed``)."""
        now = time.time_ns()
        if not self.subscribed:
            if payload == b"subscribed":
                self.subscribed = True
                sys.stdout.write("READY\n")
                sys.stdout.flush()
            return
        # A history channel's messages arrive stamped "OFFSET:"; ours hold no ':'.
        body = payload[payload.index(b":") + 1 :] if b":" in payload else payload
        kind, seq, sent = body.split(b" ", 3)[:3]
        if kind == b"e":
            report = {
                "phase": seq.decode(),
                "received": self.count,
                "gaps": self.gaps,
                "backwards": self.backwards,
                "first_ns": self.first_ns,
                "last_ns": self.last_ns,
                "latency_ns": self.latencies,
            }
            sys.stdout.write(json.dumps(report) + "\n")
            sys.stdout.flush()
            self.reset()
            return
        n = int(seq)
        if n < self.expected:
            self.backwards += 1
        elif n > self.expected:
            self.gaps += 1
        self.expected = n + 1
        if self.count == 0:
            self.first_ns = now
        self.last_ns = now
        self.count += 1
        if kind == b"l":
            self.latencies.append(now - int(sent))


def receive(port: int, channels: list[str]) -> int:
    """Subscribe to ``channels`` on the node at ``port`` and report each phase to stdout."""
    frames = Frames(port)
    frames.send_text("sub " + " ".join(channels))
    feed = Tally().feed
    for payload in frames.messages():
        feed(payload)
    return 0


async def receive_websockets(port: int, channels: list[str]) -> int:
    """:func:`receive` with the ``websockets`` asyncio client (``--receiver websockets``)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async with connect(f"ws://127.0.0.1:{port}/", compression=None, max_queue=None) as ws:
        await ws.send("sub " + " ".join(channels))
        feed = Tally().feed
        try:
            while True:
                feed(await ws.recv(decode=False))
        except ConnectionClosed as closed:
            log.warning("receiver: the node closed the connection (%s)", closed.rcvd)
    return 0


# --------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------


def cpu_s(pid: int | str, task: str | None = None) -> float:
    """User + system CPU seconds of a process (or of one of its threads)."""
    path = f"/proc/{pid}/task/{task}/stat" if task else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def client_thread() -> str:
    """This process's ``Cluster`` thread (``warpsocket-client``, cut to 15 characters)."""
    for task in Path("/proc/self/task").iterdir():
        if (task / "comm").read_text().strip().startswith("warpsocket-cli"):
            return task.name
    raise RuntimeError("no warpsocket-client thread in this process")


def wait(condition: Any, what: str, timeout: float = 60) -> Any:
    """Poll ``condition`` until truthy; raise naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.05)
    return found


class Setup:
    """Redis, a node and a subscribed receiver; ``stop()`` ends them all."""

    def __init__(self, workdir: Path, node_args: list[str], receiver: str) -> None:
        self.procs: list[subprocess.Popen[Any]] = []
        self.redis_log = open(workdir / "redis.log", "w")  # noqa: SIM115 (closed in stop)
        self.redis = Redis(None, self.redis_log)
        self.procs.append(self.redis.proc)
        worker = workdir / "bench_worker.py"
        worker.write_text(WORKER)
        node_log_path = workdir / "node.log"
        self.node_log = open(node_log_path, "w")  # noqa: SIM115 (closed in stop)
        self.node = subprocess.Popen(
            [sys.executable, "-m", "warpsocket", str(worker), "--cluster", self.redis.url,
             "--bind", "127.0.0.1:0", "--threads", "1", "--history", HISTORY_RULE, "--log-level", "INFO",
             *node_args],
            stdout=self.node_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.procs.append(self.node)

        def listening() -> int | None:
            if self.node.poll() is not None:
                raise RuntimeError(f"the node exited: {node_log_path.read_text()[-2000:]}")
            for line in node_log_path.read_text().splitlines():
                if "listening on 127.0.0.1:" in line:
                    return int(line.rsplit("127.0.0.1:", 1)[1].split()[0].rstrip(",)"))
            return None

        port = wait(listening, "the node to listen")
        self.receiver = subprocess.Popen(
            [sys.executable, __file__, "receive" if receiver == "socket" else "receive-websockets",
             str(port), PLAIN, HISTORY_CHANNEL],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.procs.append(self.receiver)
        self.lines: list[str] = []
        self.lines_ready = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.next_line(60)  # READY
        wait(lambda: self.redis.listeners(PLAIN) == 1, "the node to listen on the plain channel")
        wait(lambda: self.redis.listeners(HISTORY_CHANNEL) == 1, "the node to listen on the history channel")

    def _read(self) -> None:
        assert self.receiver.stdout is not None
        for line in self.receiver.stdout:
            with self.lines_ready:
                self.lines.append(line)
                self.lines_ready.notify_all()

    def next_line(self, timeout: float) -> str:
        """The receiver's next report line."""
        with self.lines_ready:
            if not self.lines_ready.wait_for(lambda: self.lines or self.receiver.poll() is not None, timeout):
                raise TimeoutError(f"no report from the receiver in {timeout} s")
            if not self.lines:
                raise RuntimeError(f"the receiver exited with {self.receiver.returncode}")
            return self.lines.pop(0)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of Redis, the node and the receiver."""
        return {
            "redis": cpu_s(self.redis.proc.pid),
            "node": cpu_s(self.node.pid),
            "receiver": cpu_s(self.receiver.pid),
        }

    def stop(self) -> None:
        """End every process this setup started and wait for them."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.redis_log.close()
        self.node_log.close()


# --------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------


def message(kind: str, seq: int, size: int) -> str:
    """``KIND SEQ TIME_NS`` padded with 'x' to ``size`` characters."""
    text = f"{kind} {seq} {time.time_ns()} "
    return text + "x" * (size - len(text)) if size > len(text) else text


def end_phase(cluster: Any, setup: Setup, channel: str, phase: str) -> dict[str, Any]:
    """Send the end marker until ``send`` takes it, then read the receiver's report."""
    while not cluster.send(channel, f"e {phase} 0"):
        time.sleep(0.001)
    report: dict[str, Any] = json.loads(setup.next_line(120))
    assert report["phase"] == phase, report
    return report


def throughput(
    cluster: Any, setup: Setup, channel: str, count: int, size: int, phase: str, retry: bool = False
) -> dict[str, Any]:
    """``count`` sends as fast as this thread goes; what arrived and at what rate.

    ``retry``: a send refused by the full queue is sent again after 1 ms (as an application
    that must not lose a message would do), so all ``count`` arrive; ``refused`` then
    counts the refusals, not lost messages.
    """
    me, client_tid = os.getpid(), client_thread()
    main_tid = str(threading.get_native_id())
    before_cpu = setup.cpu()
    before_py, before_client = cpu_s(me, main_tid), cpu_s(me, client_tid)
    before_calls = setup.redis.calls()
    refused = 0
    send = cluster.send
    start_ns = time.time_ns()
    for seq in range(count):
        while not send(channel, message("t", seq, size)):
            refused += 1
            if not retry:
                break
            time.sleep(0.001)
    sent_ns = time.time_ns()
    report = end_phase(cluster, setup, channel, phase)
    after_cpu = setup.cpu()
    after_calls = setup.redis.calls()
    received = report["received"]
    delivered_s = (report["last_ns"] - start_ns) / 1e9 if received else float("nan")
    window_s = (time.time_ns() - start_ns) / 1e9
    cpu = {name: after_cpu[name] - before_cpu[name] for name in after_cpu}
    cpu["python sender"] = cpu_s(me, main_tid) - before_py
    cpu["client redis thread"] = cpu_s(me, client_tid) - before_client
    calls = {
        name: (after_calls[name][0] - before_calls.get(name, (0, 0))[0],
               after_calls[name][1] - before_calls.get(name, (0, 0))[1])
        for name in ("publish", "evalsha")
        if name in after_calls
    }  # fmt: skip
    return {
        "channel": channel,
        "sent": count,
        "refused": refused,
        "lost": count - received,
        "received": received,
        "gaps": report["gaps"],
        "backwards": report["backwards"],
        "send_calls_per_s": count / ((sent_ns - start_ns) / 1e9),
        "delivered_per_s": received / delivered_s,
        "window_s": window_s,
        "cpu_s": cpu,
        "cpu_pct": {name: 100 * value / window_s for name, value in cpu.items()},
        "redis_calls": calls,
    }


def latency(
    cluster: Any, setup: Setup, channel: str, count: int, rate: float, size: int, phase: str
) -> dict[str, Any]:
    """``count`` sends paced at ``rate``/s; send -> receive latency at the receiver."""
    interval = 1 / rate
    refused = 0
    start = time.monotonic()
    for seq in range(count):
        due = start + seq * interval
        # A plain sleep, no spinning: the stamp is taken at the send, so a late wake-up
        # shifts the schedule, not the figure, and a spin would take a core from the
        # node, Redis and the receiver on this 2-core machine.
        if (left := due - time.monotonic()) > 0:
            time.sleep(left)
        if not cluster.send(channel, message("l", seq, size)):
            refused += 1
    report = end_phase(cluster, setup, channel, phase)
    lat_ms = [ns / 1e6 for ns in report["latency_ns"]]
    return {
        "channel": channel,
        "sent": count,
        "refused": refused,
        "received": report["received"],
        "gaps": report["gaps"],
        "backwards": report["backwards"],
        "p50_ms": percentile(lat_ms, 50) if lat_ms else float("nan"),
        "p99_ms": percentile(lat_ms, 99) if lat_ms else float("nan"),
        "max_ms": max(lat_ms) if lat_ms else float("nan"),
    }


def spread(values: list[float], fmt: str) -> str:
    """``median (min-max)`` of ``values``."""
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main() -> int:
    """Run the rounds and log the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=300_000, help="sends per throughput case")
    parser.add_argument("--paced", type=int, default=3_000, help="sends per latency case")
    parser.add_argument("--rate", type=float, default=1_000, help="messages/s of the latency case")
    parser.add_argument("--size", type=int, default=64, help="message size in bytes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-history", action="store_true", help="only the plain channel")
    parser.add_argument(
        "--node-arg",
        action="append",
        default=[],
        help="an extra option of the node (repeat: --node-arg=--ping-interval --node-arg=1)",
    )
    parser.add_argument(
        "--receiver",
        choices=("socket", "websockets"),
        default="socket",
        help="the receiving client: a plain socket parsing frames (default) or the websockets asyncio client",
    )
    parser.add_argument("--json", type=Path, help="write every round's figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        parser.error("needs redis-server and redis-cli (apt-get install redis-server)")

    import warpsocket

    channels = [PLAIN] if args.no_history else [PLAIN, HISTORY_CHANNEL]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        setup = Setup(Path(tmp), args.node_arg, args.receiver)
        cluster = warpsocket.Cluster(setup.redis.url, history={"hist:": warpsocket.History(100, 300)})
        try:
            # Warm up: connections, the node's first sequencing script load, caches.
            for channel in channels:
                throughput(cluster, setup, channel, min(args.messages, 20_000), args.size, f"warm-{channel}")
            for rnd in range(args.rounds):
                order = channels if rnd % 2 == 0 else channels[::-1]
                for channel in order:
                    cases = ["throughput", "retrying", "latency"]
                    for case in cases if rnd % 2 == 0 else cases[::-1]:
                        phase = f"{rnd}-{channel}-{case}"
                        if case in ("throughput", "retrying"):
                            retry = case == "retrying"
                            r = throughput(cluster, setup, channel, args.messages, args.size, phase, retry)
                            log.info(
                                "round %d %-10s " + case + ": sent %d, refused %d, received %d, gaps %d; "
                                "send() %.0f/s, delivered %.0f/s; CPU %% %s; redis %s; load %s",
                                rnd, channel, r["sent"], r["refused"], r["received"], r["gaps"],
                                r["send_calls_per_s"], r["delivered_per_s"],
                                {k: round(v) for k, v in r["cpu_pct"].items()}, r["redis_calls"],
                                os.getloadavg()[0],
                            )  # fmt: skip
                        else:
                            r = latency(cluster, setup, channel, args.paced, args.rate, args.size, phase)
                            log.info(
                                "round %d %-10s latency at %.0f/s: sent %d, refused %d, received %d, "
                                "gaps %d; "
                                "p50 %.2f ms, p99 %.2f ms, max %.2f ms; load %s",
                                rnd, channel, args.rate, r["sent"], r["refused"], r["received"], r["gaps"],
                                r["p50_ms"], r["p99_ms"], r["max_ms"], os.getloadavg()[0],
                            )  # fmt: skip
                        r.update(round=rnd, case=case, load1=os.getloadavg()[0])
                        results.append(r)
        finally:
            cluster.disconnect()
            setup.stop()

    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.machine(),
    )  # fmt: skip
    log.info("host: %s, %d CPUs, Python %s, load %s", model, os.cpu_count(), platform.python_version(),
             " ".join(f"{x:.2f}" for x in os.getloadavg()))  # fmt: skip
    complete = True
    for channel in channels:
        tp = [r for r in results if r["channel"] == channel and r["case"] == "throughput"]
        rt = [r for r in results if r["channel"] == channel and r["case"] == "retrying"]
        lat = [r for r in results if r["channel"] == channel and r["case"] == "latency"]
        for name, rows in (("throughput", tp), ("retrying", rt)):
            log.info(
                "%s %s: delivered/s %s; send() calls/s %s; refused/round %s; received/round %s",
                channel, name,
                spread([r["delivered_per_s"] for r in rows], ".0f"),
                spread([r["send_calls_per_s"] for r in rows], ".0f"),
                spread([r["refused"] for r in rows], ".0f"),
                spread([r["received"] for r in rows], ".0f"),
            )  # fmt: skip
        log.info(
            "%s latency at %.0f/s: p50 ms %s; p99 ms %s; max ms %s; refused %d",
            channel, args.rate,
            spread([r["p50_ms"] for r in lat], ".2f"),
            spread([r["p99_ms"] for r in lat], ".2f"),
            spread([r["max_ms"] for r in lat], ".2f"),
            sum(r["refused"] for r in lat),
        )  # fmt: skip
        for r in tp + lat + rt:
            # A refused send leaves a gap in the sequence (retrying: none should); a message
            # lost after send() took it shows as received + refused < sent, one duplicated or
            # reordered as backwards.
            taken = r["sent"] if r["case"] == "retrying" else r["sent"] - r["refused"]
            gaps_allowed = 0 if r["case"] == "retrying" else r["refused"]
            if r["received"] != taken or r["backwards"] or r["gaps"] > gaps_allowed:
                complete = False
                fields = ("round", "case", "sent", "refused", "received", "gaps", "backwards")
                log.warning("incomplete delivery: %s", {k: r[k] for k in fields})
    log.info("every message send() took was delivered once, in order: %s", complete)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if complete else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("receive", "receive-websockets"):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        if sys.argv[1] == "receive":
            sys.exit(receive(int(sys.argv[2]), sys.argv[3:]))
        import asyncio

        sys.exit(asyncio.run(receive_websockets(int(sys.argv[2]), sys.argv[3:])))
    sys.exit(main())
