#!/usr/bin/env python3
"""What presence costs (issue 26): in one process, time per call and bytes per tracked socket;
over two cluster nodes, churn (``churn``, described below the one-process part).

    python3 benchmarks/presence.py [--members 100000] [--small 1000] [--calls 100000] [--rounds 3]
    python3 benchmarks/presence.py churn --help

Needs the ``websockets`` client.

Each round is a fresh process (this script with ``--once``), so that every round starts
from the same heap. It starts a server in that process (``threads=1``, a worker that
answers ``"id"`` with the socket id and has no ``handle_presence``), opens 4 real
WebSocket connections to it with the ``websockets`` client, and creates ``--members``
virtual sockets spread over them: the tracked targets. A virtual socket is tracked on
its own (docs/api.md#presence), so 100,000 of them stand for 100,000 tracked sockets
without 100,000 TCP connections. The calls are made from the main thread, as a
background task of an application would; the worker thread meanwhile runs the change
events that every join and leave queues (with no handler it only unpacks them).

In order, per round:

1. **virtual sockets**: C heap (glibc ``mallinfo2``: bytes allocated, not the
   allocator's free space; steadier than RSS) before and after creating them, for their
   own cost, which the presence figures leave out: those are measured after they exist.
2. **track, join**: ``track(v, "big", "user-NNNNNN")`` for each virtual socket, each
   member new (every call a join, queuing one change event), timed as one loop: the mean
   includes the member table's growth. Then the worker's queue is awaited empty and the
   heap read again: (after - before) / members is what a tracked socket costs,
   reported with and without its member name's bytes (11 here; info is None).
3. **presence_count** of ``"big"`` (``--members`` present), ``--calls`` calls in a loop.
4. **presence** of ``"small"``: ``--small`` of the virtual sockets tracked there too,
   each its own member with a 16-byte ``str`` info; 200 calls, each timed, median.
5. **untrack, leave**: ``untrack(v, "big")`` for each, every call a leave, as one loop.
6. **track, untrack without a change**: every socket tracked in ``"tabs"`` as the one
   member ``"same"`` (a further tab of a present member: no change queued), then
   untracked, each as one loop; then the heap again, to show what the emptied channels
   gave back.
7. **track again**: step 2's joins once more, the heap read before and after: the same
   cost without the growth of the worker's event queue, whose buffers the first burst
   grew and the queue keeps (at most 65,536 events' worth per queue, whatever the number
   of tracked sockets); then untracked again.

**Three clocks.** Each loop is timed in wall time, in the calling thread's CPU time, and in
the whole process's CPU time. A join or leave queues a change for the worker thread, which
takes the GIL to unpack it (and would call ``handle_presence``): that work is not the
call's, but on a busy machine it and the GIL's hand-overs show in wall time. The calling
thread's CPU time is what the call itself does; the targets are judged on it.

**Python call overhead.** Each figure includes the interpreter's call of the ``_core``
function, PyO3's argument parsing and the conversions. It is measured with calls of the
same shape that do next to no presence work, timed as loops over lists built the same way:
``presence_count("empty")`` (a channel never tracked: a lock and a missed lookup) for
``presence_count``, and ``untrack(v, "never")`` (the socket is tracked, but not in
``"never"``: the same conversions, a lock, two lookups, no change) for ``untrack`` and for
``track``, which converts two more arguments (a borrowed ``str`` and ``None``, no copy).
What those baselines do in the core is counted as overhead, so the net figures slightly
flatter the core. The net figure is the call's thread CPU time minus its baseline's.

Prints each round's figures, then medians with min-max over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import gc
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cluster as cluster_bench  # noqa: E402 - Redis and free ports, as the cluster benchmark starts them
import run as bench  # noqa: E402 - CPU seconds, listening, stopping and fd limits of the runner

log = logging.getLogger("presence-bench")

WORKER = """\
import warpsocket


def handle_text_message(text, socket_id):
    if text == "id":
        warpsocket.send(socket_id, str(socket_id))
"""

CONNECTIONS = 4
PRESENCE_CALLS = 200
INFO = "status: available"[:16]
assert len(INFO.encode()) == 16

TARGET_CALL_NS = 2_000
TARGET_PRESENCE_NS = 1_000_000
TARGET_BYTES = 100


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def heap_bytes() -> int:
    """Bytes allocated with malloc (in arenas and mmapped); glibc >= 2.33 only."""
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def wait_idle(timeout: float = 120.0) -> None:
    """Waits until the worker has run every queued event (the joins' and leaves' changes)."""
    import warpsocket

    deadline = time.monotonic() + timeout
    while any(w["queue_depth"] for w in warpsocket.stats()["workers"]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker's queue did not drain: {warpsocket.stats()['workers']}")
        time.sleep(0.01)


def settled_heap() -> int:
    wait_idle()
    gc.collect()
    return heap_bytes()


def loop_ns(call: Callable[..., object], args: list[tuple[object, ...]]) -> tuple[float, float, float]:
    """Mean nanoseconds per ``call(*a)`` over ``args``, the loop's own cost included.

    Three clocks: wall time, this thread's CPU time, and the whole process's CPU time.
    The worker thread runs each queued change under the GIL, so wall time includes
    its share; this thread's CPU time is the call's own work.
    """
    wall, thread, process = time.perf_counter_ns(), time.thread_time_ns(), time.process_time_ns()
    for a in args:
        call(*a)
    n = len(args)
    return (
        (time.perf_counter_ns() - wall) / n,
        (time.thread_time_ns() - thread) / n,
        (time.process_time_ns() - process) / n,
    )


def store(results: dict[str, float], key: str, figures: tuple[float, float, float]) -> None:
    results[f"{key}_ns"], results[f"{key}_cpu_ns"], results[f"{key}_process_ns"] = figures


def once(members: int, small: int, calls: int) -> dict[str, float]:
    """One round in this process; returns its figures."""
    import warpsocket
    from websockets.sync.client import connect

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="warpsocket-presence-") as tmp:
        worker = Path(tmp) / "presence_bench_worker.py"
        worker.write_text(WORKER)
        with warpsocket.start("127.0.0.1:0", str(worker), threads=1) as server:
            clients = [connect(f"ws://127.0.0.1:{server.port}/", open_timeout=60) for _ in range(CONNECTIONS)]
            try:
                ids = []
                for ws in clients:
                    ws.send("id")
                    ids.append(int(ws.recv(timeout=60)))
                # Everything the loops use is built first, so the heap readings see only the server's side.
                names = [f"user-{i:06d}" for i in range(members)]
                empty_args = [("empty",)] * calls
                big_args = [("big",)] * calls

                before = settled_heap()
                create = warpsocket.create_virtual_socket
                vids = [create(ids[i % CONNECTIONS]) for i in range(members)]
                results["virtual_socket_bytes"] = (settled_heap() - before) / members

                track_args = [(v, "big", name) for v, name in zip(vids, names, strict=True)]
                untrack_args = [(v, "big") for v in vids]
                never_args = [(v, "never") for v in vids]
                small_args = [(v, "small", n, INFO) for v, n in zip(vids[:small], names, strict=False)]
                gc.collect()
                gc.disable()  # no collection inside a timed loop

                heap_before, rss_before = settled_heap(), rss_bytes()
                store(results, "track", loop_ns(warpsocket.track, track_args))
                heap_after, rss_after = settled_heap(), rss_bytes()
                results["tracked_bytes"] = (heap_after - heap_before) / members
                results["tracked_rss_bytes"] = (rss_after - rss_before) / members
                stats = warpsocket.stats()
                if warpsocket.presence_count("big") != members or stats["presence_members"] != members:
                    raise RuntimeError(
                        f"presence_count {warpsocket.presence_count('big')}, presence_members "
                        f"{stats['presence_members']}, expected {members}"
                    )

                store(results, "never", loop_ns(warpsocket.untrack, never_args))
                store(results, "count_empty", loop_ns(warpsocket.presence_count, empty_args))
                store(results, "count", loop_ns(warpsocket.presence_count, big_args))

                for a in small_args:
                    warpsocket.track(*a)
                wait_idle()
                got = warpsocket.presence("small")
                if len(got) != small or got[names[0]] != INFO:
                    raise RuntimeError(f"presence('small') has {len(got)} members, expected {small}")
                one_call = []
                for _ in range(PRESENCE_CALLS):
                    start = time.perf_counter_ns()
                    warpsocket.presence("small")
                    one_call.append(time.perf_counter_ns() - start)
                results["presence_ns"] = statistics.median(one_call)
                for v in vids[:small]:
                    warpsocket.untrack(v, "small")

                store(results, "untrack", loop_ns(warpsocket.untrack, untrack_args))
                wait_idle()
                # The same calls without a change: every socket a further tab of one member.
                same_args = [(v, "tabs", "same") for v in vids]
                warpsocket.track(*same_args[0])
                store(results, "track_same", loop_ns(warpsocket.track, same_args[1:]))
                wait_idle()
                store(results, "untrack_same", loop_ns(warpsocket.untrack, [(v, "tabs") for v in vids[1:]]))
                warpsocket.untrack(vids[0], "tabs")
                left = settled_heap()
                results["left_bytes"] = left - heap_before
                # Tracked again: the worker queue's buffers, grown by the first burst of
                # changes and kept (a bounded amount per queue), are in both readings now.
                store(results, "retrack", loop_ns(warpsocket.track, track_args))
                results["retracked_bytes"] = (settled_heap() - left) / members
                for a in untrack_args:
                    warpsocket.untrack(*a)
                wait_idle()
                gc.enable()
                stats = warpsocket.stats()
                if warpsocket.presence_count("big") != 0 or stats["presence_members"] != 0:
                    raise RuntimeError(f"members left after untracking: {stats['presence_members']}")
            finally:
                for ws in clients:
                    ws.close()
    return results


def median_range(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def verdict(value: float, target: float) -> str:
    return "met" if value <= target else "NOT met"


def report(rounds: list[dict[str, float]], members: int, small: int) -> None:
    """Logs the medians (min-max) over the rounds against the issue's targets."""

    def col(key: str) -> list[float]:
        return [r[key] for r in rounds]

    def net(key: str, baseline: str) -> list[float]:
        return [r[key] - r[baseline] for r in rounds]

    def clocks(key: str, baseline: str | None, target: float | None) -> str:
        line = (
            f"wall {median_range(col(key + '_ns'), ',.0f')}, this thread's CPU "
            f"{median_range(col(key + '_cpu_ns'), ',.0f')}, process CPU "
            f"{median_range(col(key + '_process_ns'), ',.0f')} ns per call"
        )
        if baseline is not None:
            own = net(key + "_cpu_ns", baseline + "_cpu_ns")
            line += f"; net of the call overhead (thread CPU) {median_range(own, ',.0f')} ns"
            if target is not None:
                line += f" [target <= {target / 1000:g} us: {verdict(statistics.median(own), target)}]"
        return line

    name_bytes = len(f"user-{0:06d}")
    per_socket = [b - name_bytes for b in col("tracked_bytes")]
    per_socket_again = [b - name_bytes for b in col("retracked_bytes")]
    lines = [
        f"{len(rounds)} rounds (fresh processes), median (min-max); {members:,} tracked virtual sockets "
        f"over {CONNECTIONS} connections, one member each",
        f"  presence_count, {members:,} members: {clocks('count', 'count_empty', TARGET_CALL_NS)}",
        f"  track (join, a change queued):  {clocks('track', 'never', TARGET_CALL_NS)}",
        f"  untrack (leave, a change queued): {clocks('untrack', 'never', TARGET_CALL_NS)}",
        f"  track (a further tab, no change): {clocks('track_same', 'never', None)}",
        f"  untrack (a further tab, no change): {clocks('untrack_same', 'never', None)}",
        f"  call overhead: untrack(v, 'never') {clocks('never', None, None)}; "
        f"presence_count('empty') {clocks('count_empty', None, None)}",
        f"  presence() of {small:,} members: "
        f"{median_range([v / 1000 for v in col('presence_ns')], ',.1f')} us "
        f"wall (median of {PRESENCE_CALLS} calls per round) "
        f"[target <= 1 ms: {verdict(statistics.median(col('presence_ns')), TARGET_PRESENCE_NS)}]",
        f"  heap per tracked socket: {median_range(col('tracked_bytes'), ',.1f')} bytes, "
        f"{median_range(per_socket, ',.1f')} without its {name_bytes}-byte member name "
        f"[target <= {TARGET_BYTES}: {verdict(statistics.median(per_socket), TARGET_BYTES)}]; "
        f"RSS {median_range(col('tracked_rss_bytes'), ',.1f')} bytes",
        f"  the same, tracked again (the worker queue's kept buffers in both readings): "
        f"{median_range(col('retracked_bytes'), ',.1f')} bytes, "
        f"{median_range(per_socket_again, ',.1f')} without the member name",
        "  heap per virtual socket (left out above): "
        f"{median_range(col('virtual_socket_bytes'), ',.1f')} bytes",
        f"  heap left after untracking every socket: {median_range(col('left_bytes'), ',.0f')} bytes",
    ]
    log.info("\n".join(lines))


# ---------------------------------------------------------------------------
# churn: two cluster nodes, tracks and untracks at a fixed rate
# ---------------------------------------------------------------------------

CHURN_DOC = """Presence churn over two cluster nodes (issue 26):

    python3 benchmarks/presence.py churn [--connections 10000] [--rate 1000] [--channels 100]
                                         [--seconds 60] [--rounds 3] [--sockets-per-member 4]

Needs ``redis-server`` and ``redis-cli`` (or ``--redis-url`` of a running, empty Redis)
and the ``websockets`` client.

``redis-server`` and two WarpSocket nodes (``python -m warpsocket --threads 1 --cluster``)
run pinned to ``--server-cpu``, this script (the load generator, asyncio and
``websockets``) to ``--client-cpu``, as in benchmarks/cluster.py. The generator opens
``--connections`` connections, alternately to each node; connection ``i`` belongs to the
member ``m{i // sockets-per-member}``, so a member has sockets on both nodes. Each node's
worker answers ``t CH MEMBER`` with ``track`` (``1``/``0``, what it returned), ``u CH``
with ``untrack`` and ``n CH MEMBER`` with nothing but the same parsing and a ``0``; its
``handle_presence`` appends every change to a per-(channel, member) list in memory.

The generator first tracks every connection in one random channel (so about
``--connections`` pairs are tracked throughout), then runs rounds of windows of
``--seconds`` each, one per configuration, their order flipped every round:

- ``churn``: ``--rate`` operations per second, alternately a ``track`` of a random
  connection in a random channel where it is not tracked and an ``untrack`` of a random
  tracked pair, over ``--channels`` channels;
- ``noop``: the same rate of ``n`` messages: the same connections, frames and handler
  calls, no presence work;
- ``idle`` (with ``--configs churn,noop,idle``): no messages at all.

Two operations on the same (channel, member) are never in flight together, so the
generator's model knows the order of every member's changes: from it come the truth
(each join and leave) and each call's expected result. Node CPU (both nodes, from
``/proc/PID/stat``) over each window; the CPU presence costs is ``churn - noop`` of the
same round, in % of one core (target <= 10 %).

At the end every operation's answer must have matched the model; ``presence_count`` and
``presence`` of every channel, read through ``warpsocket.Cluster``, must equal the truth;
then every connection closes, and once every channel's ``presence_count`` is 0 the nodes'
lists of changes must hold, per (channel, member), exactly the truth's joins and leaves
(each reported once, in the cluster), and their ``presence_members`` must be 0. Any
mismatch makes the exit status 1.
"""

CHURN_WORKER = """\
import json

import warpsocket

# (channel, member) -> the changes this node's handle_presence was told of, in order.
changes = {}
reported = 0


def handle_text_message(text, socket_id):
    command, _, rest = text.partition(" ")
    if command == "t":
        channel, member = rest.split(" ")
        warpsocket.send(socket_id, "1" if warpsocket.track(socket_id, channel, member) else "0")
    elif command == "u":
        warpsocket.send(socket_id, "1" if warpsocket.untrack(socket_id, rest) else "0")
    elif command == "n":
        channel, member = rest.split(" ")
        warpsocket.send(socket_id, "0")
    elif command == "count":
        warpsocket.send(socket_id, json.dumps([reported, warpsocket.stats()["presence_members"]]))
    elif command == "dump":
        warpsocket.send(socket_id, json.dumps([[c, m, flags] for (c, m), flags in changes.items()]))


def handle_presence(channel, member, joined):
    global reported
    changes.setdefault((channel, member), []).append(joined)
    reported += 1
"""

CHURN_CONFIGS = ("churn", "noop", "idle")
TARGET_PRESENCE_CORE = 0.10
OPEN_CONCURRENCY = 100


@dataclass
class Window:
    """What one configuration's window measured."""

    config: str
    round: int
    seconds: float = 0.0
    ops: int = 0
    skipped: int = 0
    node_cpu: float = 0.0  # CPU seconds of both nodes over the window
    redis_cpu: float | None = None
    generator_cpu: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    def share(self, cpu: float | None) -> float | None:
        return None if cpu is None else cpu / self.seconds


class ChurnModel:
    """The generator's view: which socket is tracked where, and every change that must be reported."""

    def __init__(self, connections: int, channels: int, per_member: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.channels = [f"c{i}" for i in range(channels)]
        self.member = [f"m{i // per_member}" for i in range(connections)]
        self.pairs: list[tuple[int, str]] = []  # tracked (socket index, channel), for a random pick
        self.where: dict[tuple[int, str], int] = {}  # pair -> its index in pairs
        self.holders: collections.Counter[tuple[str, str]] = collections.Counter()
        self.truth: dict[tuple[str, str], list[bool]] = collections.defaultdict(list)
        self.busy_sockets: set[int] = set()
        self.busy_keys: set[tuple[str, str]] = set()

    def free(self, i: int, channel: str) -> bool:
        """True if neither socket ``i`` nor its member in ``channel`` has an operation in flight."""
        return i not in self.busy_sockets and (channel, self.member[i]) not in self.busy_keys

    def pick_track(self) -> tuple[int, str] | None:
        for _ in range(20):
            i = self.rng.randrange(len(self.member))
            channel = self.rng.choice(self.channels)
            if (i, channel) not in self.where and self.free(i, channel):
                return i, channel
        return None

    def pick_untrack(self) -> tuple[int, str] | None:
        for _ in range(20):
            if not self.pairs:
                return None
            i, channel = self.pairs[self.rng.randrange(len(self.pairs))]
            if self.free(i, channel):
                return i, channel
        return None

    def pick_any(self) -> tuple[int, str] | None:
        for _ in range(20):
            i = self.rng.randrange(len(self.member))
            channel = self.rng.choice(self.channels)
            if self.free(i, channel):
                return i, channel
        return None

    def track(self, i: int, channel: str) -> str:
        """Record a track; return the answer it must get."""
        self.where[(i, channel)] = len(self.pairs)
        self.pairs.append((i, channel))
        key = (channel, self.member[i])
        self.holders[key] += 1
        if self.holders[key] == 1:
            self.truth[key].append(True)
            return "1"
        return "0"

    def untrack(self, i: int, channel: str) -> str:
        index = self.where.pop((i, channel))
        last = self.pairs.pop()
        if index < len(self.pairs):
            self.pairs[index] = last
            self.where[last] = index
        key = (channel, self.member[i])
        self.holders[key] -= 1
        if self.holders[key] == 0:
            del self.holders[key]
            self.truth[key].append(False)
            return "1"
        return "0"

    def present(self, channel: str) -> set[str]:
        return {member for (c, member) in self.holders if c == channel}

    def close_all(self) -> None:
        """Every connection closed: every member present leaves."""
        for key in list(self.holders):
            self.truth[key].append(False)
        self.holders.clear()
        self.pairs.clear()
        self.where.clear()

    def changes(self) -> int:
        return sum(len(flags) for flags in self.truth.values())


class ChurnRun:
    """The load generator and the checks of one churn benchmark."""

    def __init__(self, args: argparse.Namespace, ports: list[int], redis_url: str, pids: list[int]) -> None:
        self.args = args
        self.ports = ports
        self.redis_url = redis_url
        self.node_pids, self.redis_pid = pids[:2], (pids[2] if len(pids) > 2 else None)
        self.model = ChurnModel(args.connections, args.channels, args.sockets_per_member, args.seed)
        self.sockets: list[Any] = []
        self.controls: list[Any] = []
        self.problems: list[str] = []
        self.mismatched_answers = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.window: Window | None = None

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            log.error("%s", text)
        self.problems.append(text)

    async def connect(self, port: int) -> Any:
        from websockets.asyncio.client import connect

        return await connect(
            f"ws://127.0.0.1:{port}/", open_timeout=120, ping_interval=None, compression=None,
            max_size=None, **_no_proxy(connect),
        )  # fmt: skip

    async def open_all(self) -> None:
        limit = asyncio.Semaphore(OPEN_CONCURRENCY)

        async def one(i: int) -> Any:
            async with limit:
                return await self.connect(self.ports[i % len(self.ports)])

        started = time.monotonic()
        self.sockets = list(await asyncio.gather(*(one(i) for i in range(self.args.connections))))
        self.controls = [await self.connect(port) for port in self.ports]
        log.info("%d connections open in %.1f s", len(self.sockets), time.monotonic() - started)

    async def ask(self, node: int, command: str) -> Any:
        ws = self.controls[node]
        await ws.send(command)
        return json.loads(await asyncio.wait_for(ws.recv(), 60))

    async def operate(self, i: int, channel: str, text: str, expected: str) -> None:
        key = (channel, self.model.member[i])
        try:
            started = time.perf_counter()
            await self.sockets[i].send(text)
            answer = await asyncio.wait_for(self.sockets[i].recv(), 60)
            if self.window is not None:
                self.window.latencies_ms.append((time.perf_counter() - started) * 1000)
            if answer != expected:
                self.mismatched_answers += 1
                self.problem(f"{text!r} on socket {i} answered {answer!r}, the model says {expected!r}")
        except Exception as exc:  # noqa: BLE001 - every failure is a finding, reported at the end
            self.problem(f"{text!r} on socket {i}: {type(exc).__name__}: {exc}")
        finally:
            self.model.busy_sockets.discard(i)
            self.model.busy_keys.discard(key)

    def launch(self, kind: str) -> bool:
        """Start one operation of ``kind`` (track, untrack, noop); False if none was free."""
        model = self.model
        picked = {"track": model.pick_track, "untrack": model.pick_untrack, "noop": model.pick_any}[kind]()
        if picked is None:
            return False
        i, channel = picked
        member = model.member[i]
        if kind == "track":
            text, expected = f"t {channel} {member}", model.track(i, channel)
        elif kind == "untrack":
            text, expected = f"u {channel}", model.untrack(i, channel)
        else:
            text, expected = f"n {channel} {member}", "0"
        model.busy_sockets.add(i)
        model.busy_keys.add((channel, member))
        task = asyncio.get_running_loop().create_task(self.operate(i, channel, text, expected))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def drain(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks))

    async def preload(self) -> None:
        """Track every connection once, at a bounded pace, before the measured windows."""
        for i in range(len(self.sockets)):
            channel = self.model.rng.choice(self.model.channels)
            while not self.model.free(i, channel):
                await asyncio.sleep(0.001)
            self.model.busy_sockets.add(i)
            self.model.busy_keys.add((channel, self.model.member[i]))
            expected = self.model.track(i, channel)
            task = asyncio.get_running_loop().create_task(
                self.operate(i, channel, f"t {channel} {self.model.member[i]}", expected)
            )
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            while len(self.tasks) >= 200:
                await asyncio.sleep(0.001)
        await self.drain()

    def cpu(self) -> tuple[float, float | None, float]:
        nodes = sum(bench.cpu_seconds(pid) or 0.0 for pid in self.node_pids)
        redis = bench.cpu_seconds(self.redis_pid) if self.redis_pid is not None else None
        return nodes, redis, time.process_time()

    async def run_window(self, config: str, round_: int) -> Window:
        window = self.window = Window(config, round_)
        seconds, rate = self.args.seconds, self.args.rate
        nodes0, redis0, own0 = self.cpu()
        start = time.monotonic()
        launched = 0
        while (now := time.monotonic()) < start + seconds:
            if config != "idle":
                due = int((now - start) * rate) - launched
                for _ in range(due):
                    kind = "noop" if config == "noop" else ("track", "untrack")[launched % 2]
                    if self.launch(kind):
                        window.ops += 1
                    else:
                        window.skipped += 1
                    launched += 1
            await asyncio.sleep(0.005)
        await self.drain()
        window.seconds = time.monotonic() - start
        nodes1, redis1, own1 = self.cpu()
        window.node_cpu = nodes1 - nodes0
        window.redis_cpu = None if redis0 is None or redis1 is None else redis1 - redis0
        window.generator_cpu = own1 - own0
        self.window = None
        return window

    async def wait_reported(self, expected: int) -> list[list[int]]:
        """Poll the nodes until they were told of ``expected`` changes in all (or 120 s pass)."""
        deadline = time.monotonic() + 120
        while True:
            counts = [await self.ask(node, "count") for node in range(len(self.controls))]
            if sum(c[0] for c in counts) >= expected or time.monotonic() > deadline:
                return counts
            await asyncio.sleep(0.1)

    def check_presence(self, cluster: Any, empty: bool) -> None:
        for channel in self.model.channels:
            truth = set() if empty else self.model.present(channel)
            count = cluster.presence_count(channel)
            if count != len(truth):
                self.problem(f"presence_count({channel!r}) is {count}, the truth {len(truth)}")
            if not empty and set(cluster.presence(channel)) != truth:
                self.problem(f"presence({channel!r}) differs from the truth")

    async def verify(self) -> dict[str, int]:
        """The end checks; returns the counts the report quotes."""
        import warpsocket

        model = self.model
        await self.wait_reported(model.changes())
        with warpsocket.Cluster(self.redis_url) as cluster:
            self.check_presence(cluster, empty=False)
            present = sum(len(model.present(c)) for c in model.channels)
            before_close = model.changes()
            limit = asyncio.Semaphore(OPEN_CONCURRENCY)

            async def close(ws: Any) -> None:
                async with limit:
                    await ws.close()

            await asyncio.gather(*(close(ws) for ws in self.sockets))
            model.close_all()
            await self.wait_reported(model.changes())
            deadline = time.monotonic() + 60
            while any(cluster.presence_count(c) for c in model.channels) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            self.check_presence(cluster, empty=True)
        # A change reported twice would come in after the count was reached: give it a beat.
        await asyncio.sleep(2)
        counts = [await self.ask(node, "count") for node in range(len(self.controls))]
        for node, (_, members) in enumerate(counts):
            if members:
                self.problem(
                    f"node {node}: stats()['presence_members'] is {members} with every socket closed"
                )
        reported: dict[tuple[str, str], list[bool]] = collections.defaultdict(list)
        per_node = []
        for node in range(len(self.controls)):
            dump = await self.ask(node, "dump")
            per_node.append(sum(len(flags) for _, _, flags in dump))
            for channel, member, flags in dump:
                reported[(channel, member)].extend(flags)
        wrong = 0
        for key in set(reported) | set(model.truth):
            got, want = reported.get(key, []), model.truth.get(key, [])
            if (got.count(True), got.count(False)) != (want.count(True), want.count(False)):
                wrong += 1
                self.problem(
                    f"{key}: reported {got.count(True)} joins and {got.count(False)} leaves, "
                    f"the truth {want.count(True)} and {want.count(False)}"
                )
        return {
            "changes": model.changes(),
            "changes_before_close": before_close,
            "reported": sum(per_node),
            "reported_node_a": per_node[0],
            "reported_node_b": per_node[1],
            "keys": len(model.truth),
            "wrong_keys": wrong,
            "present_at_end": present,
        }

    async def run(self) -> tuple[list[Window], dict[str, int]]:
        await self.open_all()
        started = time.monotonic()
        await self.preload()
        log.info(
            "preloaded %d tracked pairs in %.1f s (%d members present)",
            len(self.model.pairs), time.monotonic() - started, len(self.model.holders),
        )  # fmt: skip
        windows = []
        configs = self.args.configs
        for round_ in range(1, self.args.rounds + 1):
            for config in configs if round_ % 2 else configs[::-1]:
                window = await self.run_window(config, round_)
                windows.append(window)
                log.info("round %d %s: %s", round_, config, window_line(window, self.args.rate))
        checks = await self.verify()
        for ws in self.controls:
            await ws.close()
        return windows, checks


def _no_proxy(connect: Callable[..., object]) -> dict[str, Any]:
    """Newer websockets read proxies from the environment; the generator talks to loopback only."""
    import inspect

    return {"proxy": None} if "proxy" in inspect.signature(connect).parameters else {}


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def window_line(w: Window, rate: float) -> str:
    redis = w.share(w.redis_cpu)
    p50, p99 = pct(w.latencies_ms, 50), pct(w.latencies_ms, 99)
    return (
        f"{w.ops / w.seconds:,.0f} ops/s of {rate:,.0f} ({w.skipped} skipped), "
        f"nodes {w.node_cpu / w.seconds:.1%} of a core, Redis "
        f"{'-' if redis is None else f'{redis:.1%}'}, generator {w.generator_cpu / w.seconds:.1%}, "
        f"answer p50 {'-' if p50 is None else f'{p50:.1f}'} ms, p99 {'-' if p99 is None else f'{p99:.1f}'} ms"
    )


def churn_report(
    windows: list[Window], checks: dict[str, int], args: argparse.Namespace, problems: int
) -> bool:
    """Logs the medians (min-max) per configuration and the verdicts; True if every check passed."""

    def spread(values: list[float], fmt: str) -> str:
        return median_range(values, fmt) if values else "-"

    lines = [
        f"{args.rounds} rounds of {args.seconds:g} s windows, {args.connections:,} connections over 2 nodes, "
        f"{args.channels} channels, {args.sockets_per_member} sockets per member, median (min-max):"
    ]
    for config in args.configs:
        ws = [w for w in windows if w.config == config]
        redis = [v for w in ws if (v := w.share(w.redis_cpu)) is not None]
        lines.append(
            f"  {config}: {spread([w.ops / w.seconds for w in ws], ',.0f')} ops/s; node CPU "
            f"{spread([100 * w.node_cpu / w.seconds for w in ws], '.1f')} % of a core; Redis "
            f"{spread([100 * v for v in redis], '.1f')} %; generator "
            f"{spread([100 * w.generator_cpu / w.seconds for w in ws], '.1f')} %; answer p50 "
            f"{spread([v for w in ws if (v := pct(w.latencies_ms, 50)) is not None], '.2f')} ms, p99 "
            f"{spread([v for w in ws if (v := pct(w.latencies_ms, 99)) is not None], '.2f')} ms"
        )
    ok = problems == 0
    by_round = {(w.config, w.round): w for w in windows}
    rounds = range(1, args.rounds + 1)
    for baseline, meaning in (("noop", "the same rate of no-ops"), ("idle", "the same connections idle")):
        if "churn" not in args.configs or baseline not in args.configs:
            continue
        pairs = [(by_round[("churn", r)], by_round[(baseline, r)]) for r in rounds]
        extra = [c.node_cpu / c.seconds - b.node_cpu / b.seconds for c, b in pairs]
        redis_extra = [
            c.redis_cpu / c.seconds - b.redis_cpu / b.seconds
            for c, b in pairs
            if c.redis_cpu is not None and b.redis_cpu is not None
        ]
        target = (
            f"target <= {TARGET_PRESENCE_CORE:.0%}: {verdict(statistics.median(extra), TARGET_PRESENCE_CORE)}"
        )
        lines.append(
            f"  node CPU for presence (churn - {baseline}: {meaning}, per round): "
            f"{median_range([100 * e for e in extra], '.1f')} % of one core"
            + (f" [{target}]" if baseline == "noop" else " (message handling included)")
            + f"; Redis {spread([100 * e for e in redis_extra], '.1f')} %"
        )
    churn = [w for w in windows if w.config != "idle"]
    achieved = min((w.ops / w.seconds / args.rate for w in churn), default=1.0)
    busiest = max((w.generator_cpu / w.seconds for w in windows), default=0.0)
    limited = achieved < 0.95 or busiest > 0.9
    lines.append(
        f"  load generator: lowest rate {achieved:.1%} of the target, busiest window {busiest:.0%} "
        "of its core: " + ("it WAS the limit" if limited else "not the limit")
    )
    lines.append(
        f"  checks: {checks['changes']:,} changes in the truth ({checks['changes_before_close']:,} "
        f"before the connections closed) over {checks['keys']:,} (channel, member) pairs; reported "
        f"{checks['reported']:,} ({checks['reported_node_a']:,} on node A, "
        f"{checks['reported_node_b']:,} on node B); "
        f"pairs whose joins or leaves differ from the truth: {checks['wrong_keys']}; "
        f"{checks['present_at_end']:,} members present before the close, presence_count equal to the truth: "
        + ("yes" if problems == 0 else "see the problems above")
    )
    lines.append(f"  verdict: {'PASS' if ok else f'FAIL, {problems} problem(s)'}")
    log.info("\n".join(lines))
    return ok


def churn_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="presence.py churn", description=CHURN_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=1_000.0, help="operations per second")
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds per window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sockets-per-member", type=int, default=4)
    parser.add_argument("--configs", default="churn,noop", help="comma-separated: churn, noop, idle")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--redis-url", help="use this (empty) Redis instead of starting redis-server")
    parser.add_argument("--server-cpu", default="0", help="taskset CPU list for the nodes and Redis")
    parser.add_argument("--client-cpu", default="1", help="CPU list for this script (the generator)")
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if any(c not in CHURN_CONFIGS for c in args.configs):
        parser.error(f"--configs takes {', '.join(CHURN_CONFIGS)}")
    if args.connections < 2 or args.connections % 2:
        parser.error("--connections must be even (half on each node)")
    if args.redis_url is None and not (shutil.which("redis-server") and shutil.which("redis-cli")):
        parser.error("needs redis-server and redis-cli (apt-get install redis-server), or --redis-url")
    cpus = {int(c) for c in args.client_cpu.split(",")} & os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    bench.raise_fd_limit(args.connections + 1024)
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        "unknown CPU",
    )  # fmt: skip
    log.info(
        "host: %s, %d CPUs; Python %s, pid %d, load average %s",
        model, os.cpu_count(), sys.version.split()[0], os.getpid(), os.getloadavg(),
    )  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="warpsocket-churn-") as tmp:
        worker = Path(tmp) / "presence_churn_worker.py"
        worker.write_text(CHURN_WORKER)
        log_file = open(Path(tmp) / "nodes.log", "w")  # noqa: SIM115 - closed below
        redis = None if args.redis_url else cluster_bench.Redis(args.server_cpu, log_file)
        url = args.redis_url or redis.url  # type: ignore[union-attr]
        ports = [cluster_bench.free_port(), cluster_bench.free_port()]
        # Without taskset (util-linux) the nodes run unpinned.
        pin = ["taskset", "-c", args.server_cpu] if shutil.which("taskset") else []
        command = [
            *pin, sys.executable, "-m", "warpsocket", str(worker),
            "--threads", "1", "--cluster", url, "--log-level", "WARNING",
        ]  # fmt: skip
        nodes = [
            subprocess.Popen(
                [*command, "--bind", f"127.0.0.1:{port}"], stdout=log_file, stderr=subprocess.STDOUT
            )
            for port in ports
        ]
        ok = False
        try:
            for node, port in zip(nodes, ports, strict=True):
                bench.wait_listening([port], node, timeout=60)
            pids = [n.pid for n in nodes] + ([redis.proc.pid] if redis else [])
            run = ChurnRun(args, ports, url, pids)
            windows, checks = asyncio.run(run.run())
            ok = churn_report(windows, checks, args, len(run.problems))
        except BaseException:
            ok = False
            raise
        finally:
            for node in nodes:
                bench.stop(node)
            if redis is not None:
                bench.stop(redis.proc)
            log_file.close()
            text = (Path(tmp) / "nodes.log").read_text()
            if not ok:
                log.info("the nodes' and Redis's output:\n%s", text[-4000:])
    log.info("load average after: %s", os.getloadavg())
    return 0 if ok else 1


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if sys.argv[1:2] == ["churn"]:
        return churn_main(sys.argv[2:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=100_000, help="tracked sockets (one member each)")
    parser.add_argument("--small", type=int, default=1_000, help="members of the channel presence() reads")
    parser.add_argument("--calls", type=int, default=100_000, help="presence_count calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small > args.members:
        parser.error("--small must be at most --members")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.once:
        print(json.dumps(once(args.members, args.small, args.calls)), flush=True)
        return 0
    log.info("Python %s, pid %d, load average %s", sys.version.split()[0], os.getpid(), os.getloadavg())
    rounds = []
    for round_ in range(args.rounds):
        done = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--once",
                "--members",
                str(args.members),
                "--small",
                str(args.small),
                "--calls",
                str(args.calls),
            ],  # fmt: skip
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rounds.append(result)
        log.info("round %d: %s", round_ + 1, json.dumps({k: round(v, 1) for k, v in result.items()}))
    report(rounds, args.members, args.small)
    log.info("load average after: %s", os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
