"""Server process of the soak benchmark (benchmarks/soak.py runs it; not meant to be run by hand).

Starts WarpSocket with ``warpsocket.start`` and benchmarks/soak_worker.py, runs the
publisher in a thread of its own, and answers commands read from stdin, one JSON line
on stdout each:

    sample   this process's RSS, C heap (glibc mallinfo2), threads, open fds, stats(),
             the kv counters the worker keeps and presence_count of the presence channels
             ``room0``, ``room1``, ...
    final    like sample, plus the kv keys that must exist now (every connection gone)
    stop     stop the publisher and the server, then exit

The publisher numbers each channel's broadcasts 1, 2, 3, ... and stores the number in
kv *before* sending it (``soak:seq:<channel>``): see soak_worker.py for why the checks
built on that are exact. It also publishes to the history channels ``hist0``, ``hist1``,
... (``History(--history-size)``) and ``tiny0`` (``History(--tiny-size)``, small enough
that recovering clients miss messages it no longer keeps); there it is the only sender,
so the number in each message equals the offset WarpSocket stamps it with, and no kv is
needed. The first line on stdout is ``{"port": PORT}``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import warpsocket

WORKER = Path(__file__).resolve().parent / "soak_worker.py"
# Prefixes of the history policies: ``hist0``, ``hist1``, ... and ``tiny0``.
HISTORY = ("hist", "tiny")
# Far longer than any disconnect window: messages leave history by count, not by age.
HISTORY_TTL = 3600.0
PADDING = "." * 48


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def heap_bytes() -> int | None:
    """Bytes allocated with malloc (in arenas and mmapped), or None off glibc >= 2.33."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except AttributeError:
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def proc_status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def publish(
    channels: list[str], history: list[str], rate: float, stop: threading.Event, counts: dict[str, int]
) -> None:
    """Broadcast ``rate`` numbered messages per second on every channel until ``stop``."""
    period = 1.0 / rate
    next_round = time.monotonic()
    while not stop.is_set():
        for channel in channels:
            seq = counts[channel] + 1
            warpsocket.set_key(f"soak:seq:{channel}", str(seq))
            warpsocket.send(channel, f"{channel} {seq} {PADDING}")
            counts[channel] = seq
        for channel in history:
            seq = counts[channel] + 1
            warpsocket.send(channel, f"{channel} {seq} {PADDING}")
            counts[channel] = seq
        next_round += period
        delay = next_round - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        else:  # behind (a loaded machine): carry on from now instead of bursting
            next_round = time.monotonic()


def kv_int(key: str) -> int:
    value = warpsocket.get_key(key)
    return 0 if value is None else int(value)


def sample(counts: dict[str, int], rooms: list[str]) -> dict[str, Any]:
    stats = warpsocket.stats()
    workers = (warpsocket.get_key("soak:workers") or b"").decode().split()
    violations = (warpsocket.get_key("soak:violations") or b"").decode()
    return {
        "time": time.monotonic(),
        "rss": proc_status("VmRSS") * 1024,
        "heap": heap_bytes(),
        "threads": proc_status("Threads"),
        "fds": len(os.listdir("/proc/self/fd")),
        "stats": {key: value for key, value in stats.items() if isinstance(value, int)},
        "opens": kv_int("soak:opens"),
        "closes": kv_int("soak:closes"),
        "cas": kv_int("soak:cas"),
        "joins": kv_int("soak:pres:joins"),
        "leaves": kv_int("soak:pres:leaves"),
        "presence": {room: warpsocket.presence_count(room) for room in rooms},
        "cas_by_workers": sum(kv_int(f"soak:cas:{worker}") for worker in workers),
        "published": sum(counts.values()),
        "violations": violations.splitlines(),
        "workers": workers,
        "positions": {
            channel: warpsocket.position(channel)[1] for channel in counts if channel.startswith(HISTORY)
        },
    }


def expected_keys(channels: list[str], workers: list[str]) -> int:
    """The kv keys that exist when no connection is open: the soak's counters, nothing per socket."""
    names = [f"soak:seq:{channel}" for channel in channels]
    names += ["soak:opens", "soak:closes", "soak:cas", "soak:workers", "soak:violations"]
    names += ["soak:pres:joins", "soak:pres:leaves"]
    names += [f"soak:cas:{worker}" for worker in workers]
    return sum(warpsocket.get_key(name) is not None for name in names)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--channels", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--max-backpressure", type=int, required=True)
    parser.add_argument("--ping-interval", type=float, required=True)
    parser.add_argument("--ping-timeout", type=float, required=True)
    parser.add_argument("--history-channels", type=int, required=True)
    parser.add_argument("--history-size", type=int, required=True)
    parser.add_argument("--tiny-size", type=int, required=True)
    parser.add_argument("--presence-channels", type=int, required=True)
    args = parser.parse_args()

    # Every slow reader's 1008 is a warning; errors (a handler that raised) still show.
    logging.getLogger("warpsocket").setLevel(logging.ERROR)
    channels = [f"ch{i}" for i in range(args.channels)]
    history = [f"hist{i}" for i in range(args.history_channels)] + ["tiny0"]
    counts = dict.fromkeys(channels + history, 0)
    rooms = [f"room{i}" for i in range(args.presence_channels)]
    stop = threading.Event()
    server = warpsocket.start(
        "127.0.0.1:0",
        str(WORKER),
        threads=args.threads,
        max_backpressure=args.max_backpressure,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        history={
            "hist": warpsocket.History(args.history_size, ttl=HISTORY_TTL),
            "tiny": warpsocket.History(args.tiny_size, ttl=HISTORY_TTL),
        },
    )
    publisher = threading.Thread(
        target=publish, args=(channels, history, args.rate, stop, counts), name="soak-publisher", daemon=True
    )
    publisher.start()
    print(json.dumps({"port": server.port}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "sample":
            print(json.dumps(sample(counts, rooms)), flush=True)
        elif command == "final":
            report = sample(counts, rooms)
            report["expected_keys"] = expected_keys(channels, report["workers"])
            print(json.dumps(report), flush=True)
        elif command == "stop":
            break
    stop.set()
    publisher.join()
    server.stop(timeout=10)
    print(json.dumps({"stopped": True}), flush=True)


if __name__ == "__main__":
    main()
