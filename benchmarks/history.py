#!/usr/bin/env python3
"""What history channels cost (issue 25): instructions per send, and memory per kept message.

    python3 benchmarks/history.py [--sends 2000] [--rounds 3] [--part both|sends|memory]

Needs valgrind (``apt-get install valgrind``) and the ``websockets`` client.

**Instructions per send, history vs plain** (callgrind). Each round runs the server
process twice under ``valgrind --tool=callgrind --instr-atstart=no`` (all threads
counted), once per mode, in alternating order round by round. The server process
(``threads=1``, ``history={"h:": History(size=100)}``, stamps on) is this script with
``--serve``; it sends what it is told to on stdin. This process (not under valgrind)
connects 10 real ``websockets`` clients, each of which asks the worker module to
subscribe it to both ``h:room`` and ``p:room`` and then reads every frame. Then, per
mode: 200 warm-up sends (more than the history's size, so the ring is full and every
counted send evicts one), then ``callgrind_control -i on``, ``--sends`` sends of a
60-byte text message to ``h:room`` (history) or ``p:room`` (plain), in chunks of 100
(the next chunk starts when all 10 clients have read the last: nothing queues up,
backpressure never triggers), then ``callgrind_control -i off``. The figure is the
counted instructions divided by the sends: the ``send`` call from Python and all the
server's work for it (stamp, keep, encode, write to 10 sockets). Every client checks
that it got every message, in order, stamped ``OFFSET:`` with consecutive offsets on
``h:room`` and unchanged on ``p:room``; anything else fails the run.

**Memory per kept message.** Each round is a fresh process (this script with
``--memory-once``): a server with ``history={"": History(size=100, ttl=3600)}`` and no
clients; VmRSS (``/proc/self/status``, after ``gc.collect()``), then 100 sends of a
60-byte text message (each one different) to each of 10,000 channels, VmRSS again.
Prints (after - before) / 1,000,000 per kept message, against the target of data + 64
bytes (124 here), and checks ``stats()["history_messages"] == 1_000_000``.

Prints per-round figures, then medians with min-max.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metrics_cost import callgrind_control, total_instructions  # noqa: E402 - the same callgrind plumbing

WORKER = """\
import warpsocket


def handle_text_message(text, socket_id):
    if text == "sub":
        warpsocket.subscribe(socket_id, "h:room")
        warpsocket.subscribe(socket_id, "p:room")
        warpsocket.send(socket_id, "ok")
"""

MESSAGE = '{"type":"evt","t":"This is a message to my dear clients..."}'
assert len(MESSAGE.encode()) == 60
CHANNELS = {"history": "h:room", "plain": "p:room"}
CLIENTS = 10
CHUNK = 100
WARMUP = 200
HISTORY_SIZE = 100
MEMORY_CHANNELS = 10_000
MEMORY_TARGET = 60 + 64


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def serve() -> int:
    """The server process: run the server, send what stdin asks for."""
    import warpsocket

    with tempfile.TemporaryDirectory(prefix="warpsocket-history-") as tmp:
        worker = Path(tmp) / "history_bench_worker.py"
        worker.write_text(WORKER)
        history = {"h:": warpsocket.History(size=HISTORY_SIZE)}
        with warpsocket.start("127.0.0.1:0", str(worker), threads=1, history=history) as server:
            print(server.port, flush=True)
            send = warpsocket.send
            for line in sys.stdin:
                command = line.split()
                if command[0] == "send":
                    channel, count = command[1], int(command[2])
                    for _ in range(count):
                        send(channel, MESSAGE)
                elif command[0] == "stats":
                    print(json.dumps(warpsocket.stats()), flush=True)
    return 0


async def drive(proc: subprocess.Popen[str], port: int, mode: str, sends: int) -> None:
    """Connect the clients, warm up, count ``sends`` sends to the mode's channel."""
    from websockets.asyncio.client import connect

    channel = CHANNELS[mode]
    stamped = mode == "history"
    target = 0
    reached = [asyncio.Event() for _ in range(CLIENTS)]
    received = [0] * CLIENTS
    failures: list[str] = []
    ready = asyncio.Semaphore(0)

    async def client(index: int) -> None:
        async with connect(
            f"ws://127.0.0.1:{port}/", open_timeout=600, ping_interval=None, max_queue=None
        ) as ws:
            await ws.send("sub")
            if (reply := await ws.recv()) != "ok":
                raise RuntimeError(f"client {index}: expected 'ok', got {reply!r}")
            ready.release()
            recv, total = ws.recv, WARMUP + sends
            while received[index] < total:
                frame = await recv()
                count = received[index] = received[index] + 1
                expected = f"{count}:{MESSAGE}" if stamped else MESSAGE
                if frame != expected and len(failures) < 10:
                    failures.append(f"client {index} frame {count}: {frame!r} != {expected!r}")
                if count >= target:
                    reached[index].set()
            # Anything more than what was sent would arrive now.
            try:
                extra = await asyncio.wait_for(recv(), 0.5)
            except asyncio.TimeoutError:
                return
            failures.append(f"client {index}: an extra frame {extra!r}")

    def command(text: str) -> None:
        assert proc.stdin is not None
        proc.stdin.write(text + "\n")
        proc.stdin.flush()

    async def batch(count: int) -> None:
        nonlocal target
        for event in reached:
            event.clear()
        target += count
        command(f"send {channel} {count}")
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in reached)), 600)
        except asyncio.TimeoutError:
            raise RuntimeError(f"clients stuck at {received}, expected {target} each") from None

    tasks = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
    for _ in range(CLIENTS):
        await ready.acquire()
    await batch(WARMUP)
    await asyncio.to_thread(callgrind_control, proc.pid, "--instr=on")
    for start in range(0, sends, CHUNK):
        await batch(min(CHUNK, sends - start))
    await asyncio.to_thread(callgrind_control, proc.pid, "--instr=off")
    await asyncio.gather(*tasks)
    if failures:
        raise RuntimeError("wrong frames:\n  " + "\n  ".join(failures))
    if received != [WARMUP + sends] * CLIENTS:
        raise RuntimeError(f"received {received}, expected {WARMUP + sends} each")
    command("stats")
    assert proc.stdout is not None
    stats = json.loads(await asyncio.to_thread(proc.stdout.readline))
    if stats["backpressure_closes"] or stats["messages_out"] != CLIENTS * (WARMUP + sends + 1):
        raise RuntimeError(f"unexpected server stats: {stats}")
    expected_kept = HISTORY_SIZE if stamped else 0
    if stats["history_messages"] != expected_kept:
        raise RuntimeError(f"history_messages {stats['history_messages']} != {expected_kept}")


def instructions_once(mode: str, sends: int) -> float:
    with tempfile.TemporaryDirectory(prefix="warpsocket-callgrind-") as tmp:
        out_dir = Path(tmp)
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
            f"--callgrind-out-file={out_dir}/callgrind.out.%p",
            sys.executable, str(Path(__file__).resolve()), "--serve",
        ]  # fmt: skip
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the server process exited with {proc.wait(60)}")
            asyncio.run(drive(proc, int(line), mode, sends))
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            if proc.wait(600) != 0:
                raise RuntimeError(f"the server process exited with {proc.returncode}")
        return total_instructions(out_dir) / sends


def memory_once() -> int:
    """One fresh process: bytes of RSS per kept message, as JSON on stdout."""
    import warpsocket

    channels = [f"c{i}" for i in range(MEMORY_CHANNELS)]
    history = {"": warpsocket.History(size=HISTORY_SIZE, ttl=3600)}
    with tempfile.TemporaryDirectory(prefix="warpsocket-history-") as tmp:
        worker = Path(tmp) / "history_bench_worker.py"
        worker.write_text(WORKER)
        with warpsocket.start("127.0.0.1:0", str(worker), threads=1, history=history):
            time.sleep(0.5)
            gc.collect()
            before = rss_bytes()
            send = warpsocket.send
            for round_ in range(HISTORY_SIZE):
                for i, channel in enumerate(channels):
                    # 60 bytes, each message different.
                    send(channel, f"{round_:03d}/{i:05d}/{MESSAGE[10:]}")
            gc.collect()
            after = rss_bytes()
            stats = warpsocket.stats()
    kept = HISTORY_SIZE * MEMORY_CHANNELS
    if stats["history_messages"] != kept or stats["history_channels"] != MEMORY_CHANNELS:
        raise RuntimeError(
            f"history_messages {stats['history_messages']} (expected {kept}), "
            f"history_channels {stats['history_channels']} (expected {MEMORY_CHANNELS})"
        )
    print(json.dumps({"before": before, "after": after, "kept": kept}), flush=True)
    return 0


def median_range(values: list[float], fmt: str = ",.0f") -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def instructions(rounds: int, sends: int) -> None:
    results: dict[str, list[float]] = {"history": [], "plain": []}
    for round_ in range(rounds):
        # Alternate which goes first, so neither always runs on a warmer machine.
        order = ("history", "plain") if round_ % 2 == 0 else ("plain", "history")
        for mode in order:
            per_send = instructions_once(mode, sends)
            results[mode].append(per_send)
            print(f"round {round_ + 1} {mode:7s}: {per_send:,.0f} instructions per send", flush=True)
    ratios = [h / p for h, p in zip(results["history"], results["plain"], strict=True)]
    history, plain = statistics.median(results["history"]), statistics.median(results["plain"])
    print(
        f"\ninstructions per send ({sends:,} sends of 60 bytes to {CLIENTS} subscribers, "
        f"{rounds} rounds, median (min-max)):\n"
        f"  history {median_range(results['history'])}\n"
        f"  plain   {median_range(results['plain'])}\n"
        f"  history/plain {history / plain:.3f} at the medians; per round "
        + ", ".join(f"{r:.3f}" for r in ratios),
        flush=True,
    )


def memory(rounds: int) -> None:
    per_message: list[float] = []
    for round_ in range(rounds):
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--memory-once"],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        grown = result["after"] - result["before"]
        per_message.append(grown / result["kept"])
        print(
            f"round {round_ + 1} memory: RSS {result['before'] / 2**20:.1f} -> "
            f"{result['after'] / 2**20:.1f} MiB, {grown / result['kept']:.1f} bytes per kept message",
            flush=True,
        )
    met = statistics.median(per_message) <= MEMORY_TARGET
    print(
        f"\nbytes per kept message (1,000,000 kept, 60-byte data, {rounds} fresh processes, "
        f"median (min-max)): {median_range(per_message, '.1f')}; target <= {MEMORY_TARGET}: "
        f"{'met' if met else 'NOT met'} at the median, "
        f"{'met' if max(per_message) <= MEMORY_TARGET else 'NOT met'} in every round",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sends", type=int, default=2000, help="counted sends per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--part", choices=("both", "sends", "memory"), default="both")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-once", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve()
    if args.memory_once:
        return memory_once()
    print(f"Python {sys.version.split()[0]}, pid {os.getpid()}", flush=True)
    if args.part in ("both", "sends"):
        instructions(args.rounds, args.sends)
    if args.part in ("both", "memory"):
        memory(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
