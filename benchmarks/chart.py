#!/usr/bin/env python3
"""Chart benchmarks/run.py's open-loop results: server CPU per request and p99 against load.

    python3 benchmarks/run.py --open-loop --json /tmp/results.json ...
    python3 benchmarks/chart.py /tmp/results.json docs/bench-open-loop.png

One row of two panels per (client, connection count) in the results: server CPU µs per
acknowledged request (left) and p99 latency from the scheduled send time (right, log
scale), each against the offered load in requests/s, one line per server, the median of
the rounds at each load with the min–max as error bars. The closed-loop (saturated)
medians are drawn as single markers at their achieved rate. Needs matplotlib (the
``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import report  # noqa: E402

Run = dict[str, Any]


def stats(runs: list[Run], value: Callable[[Run], float | None]) -> tuple[float, float, float] | None:
    """(median, median - min, max - median) of ``value`` over the runs that have it."""
    values = [v for r in runs if report.ok(r) and (v := value(r)) is not None]
    if not values:
        return None
    median = statistics.median(values)
    return median, median - min(values), max(values) - median


def p99(r: Run) -> float | None:
    """The run's p99 latency in ms."""
    return r["figures"].get("p99_ms")


def main() -> int:
    """Read the JSON, draw, write the PNG."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path, help="JSON written by run.py --json")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--title", default="", help="a line above the panels (machine, date, commit)")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: list[Run] = json.loads(args.results.read_text())
    setups = list(dict.fromkeys((r["client"], r["connections"]) for r in results))
    servers = list(dict.fromkeys(r["server"] for r in results))
    fig, axes = plt.subplots(len(setups), 2, figsize=(12, 4.2 * len(setups)), squeeze=False)
    for (client, conns), (cpu_ax, p99_ax) in zip(setups, axes, strict=True):
        for server in servers:
            mine = [
                r for r in results if (r["client"], r["connections"], r["server"]) == (client, conns, server)
            ]
            shares = sorted({r["fraction"] for r in mine if r["fraction"] is not None})
            for ax, value in ((cpu_ax, report.cpu_us_per_request), (p99_ax, p99)):
                points = []
                for share in shares:
                    at = [r for r in mine if r["fraction"] == share]
                    if (s := stats(at, value)) is not None:
                        points.append((statistics.median(r["rate"] for r in at), *s))
                line = None
                if points:
                    x, y, low, high = zip(*points, strict=True)
                    line = ax.errorbar(x, y, yerr=(low, high), marker="o", capsize=3, label=server)
                closed = [r for r in mine if r["fraction"] is None]
                sat = stats(closed, value)
                rate = stats(closed, lambda r: r["figures"].get("acks_per_s"))
                if sat is not None and rate is not None:
                    color = line.lines[0].get_color() if line is not None else None
                    label = None if line is not None else server
                    ax.plot([rate[0]], [sat[0]], marker="*", markersize=12, color=color, label=label)
        title = f"{client}, {conns:,} connections"
        cpu_ax.set(title=f"server CPU per request — {title}", xlabel="offered load, requests/s",
                   ylabel="server CPU µs / request")  # fmt: skip
        p99_ax.set(title=f"p99 latency — {title}", xlabel="offered load, requests/s",
                   ylabel="p99 ms (from scheduled send)", yscale="log")  # fmt: skip
        for ax in (cpu_ax, p99_ax):
            ax.set_ylim(bottom=0 if ax is cpu_ax else None)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
    fig.suptitle(
        (args.title + "\n" if args.title else "")
        + "open loop at shares of socketify's saturated rate (dots, median and min–max of the rounds); "
        + "★ closed loop (saturated)",
        fontsize="small",
    )
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
