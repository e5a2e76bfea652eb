#!/usr/bin/env python3
"""What presence costs in one process (issue 26): time per call, and bytes per tracked socket.

    python3 benchmarks/presence.py [--members 100000] [--small 1000] [--calls 100000] [--rounds 3]

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
import ctypes
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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
        "  heap per virtual socket (left out above): "
        f"{median_range(col('virtual_socket_bytes'), ',.1f')} bytes",
        f"  heap left after untracking every socket: {median_range(col('left_bytes'), ',.0f')} bytes",
    ]
    log.info("\n".join(lines))


def main() -> int:
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
