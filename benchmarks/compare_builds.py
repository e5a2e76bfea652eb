#!/usr/bin/env python3
"""Compare two builds of WarpSocket side by side: micro-benchmarks and the seed workload.

    python3 benchmarks/compare_builds.py before=/work/before/venv/bin/python \\
        after=.venv/bin/python --rounds 3

Each ``LABEL=PYTHON`` names an interpreter with a build of WarpSocket installed. Every
round runs ``benchmarks/micro.py`` and then ``benchmarks/run.py --servers warpsocket``
under each interpreter; the order of the builds alternates round by round, so a noisy
spell of the machine falls on both. Prints, per figure, the median of the rounds with
the min-max spread, and the ratio of the medians to the first build.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def micro(python: str, iterations: int) -> dict[str, float]:
    """µs per call of each micro-benchmark line."""
    out = subprocess.run(
        [python, str(ROOT / "benchmarks" / "micro.py"), "--iterations", str(iterations)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    figures = {}
    for line in out.splitlines():
        if line.endswith("µs/call"):
            name, value = line[: -len("µs/call")].rsplit(None, 1)
            figures[f"{name.strip()} (µs/call)"] = float(value)
    return figures


def workload(python: str, connections: str, duration: float) -> dict[str, float]:
    """Acks per server CPU-second, p99 and peak RSS per connection count."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "run.json"
        subprocess.run(
            [python, str(ROOT / "benchmarks" / "run.py"), "--servers", "warpsocket",
             "--connections", connections, "--repeat", "1", "--duration", str(duration),
             "--no-install", "--json", str(raw)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        results = json.loads(raw.read_text())
    figures = {}
    for r in results:
        n = r["connections"]
        acks = r["figures"].get("acks", 0)
        if r["server_cpu_s"]:
            figures[f"{n} conns: acks per server CPU-s"] = acks / r["server_cpu_s"]
        if "p99_ms" in r["figures"]:
            figures[f"{n} conns: p99 (ms)"] = r["figures"]["p99_ms"]
        if r["peak_rss_mib"]:
            figures[f"{n} conns: peak RSS (MiB)"] = r["peak_rss_mib"]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs=2, metavar="LABEL=PYTHON")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--connections", default="1000,10000")
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    builds = [tuple(b.split("=", 1)) for b in args.builds]
    samples: dict[str, dict[str, list[float]]] = {label: {} for label, _ in builds}
    for rnd in range(args.rounds):
        order = builds if rnd % 2 == 0 else builds[::-1]
        for label, python in order:
            print(f"round {rnd + 1}: {label}", file=sys.stderr, flush=True)
            figures = {**micro(python, args.iterations), **workload(python, args.connections, args.duration)}
            for name, value in figures.items():
                samples[label].setdefault(name, []).append(value)
    first = builds[0][0]
    labels = [label for label, _ in builds]
    print(f"| figure | {' | '.join(labels)} | ratio {labels[1]}/{first} |")
    print(f"|---|{'---|' * len(labels)}---|")
    for name in samples[first]:
        cells, medians = [], []
        for label in labels:
            values = samples[label].get(name, [])
            if not values:
                cells.append("–")
                continue
            med = statistics.median(values)
            medians.append(med)
            cells.append(f"{med:,.2f} ({min(values):,.2f}–{max(values):,.2f})")
        ratio = f"{medians[1] / medians[0]:.2f}" if len(medians) == 2 and medians[0] else "–"
        print(f"| {name} | {' | '.join(cells)} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
