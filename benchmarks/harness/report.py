"""Markdown tables of benchmarks/run.py's results: every run, and medians (min–max) over rounds."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from typing import Any

from harness import perfstat

#: One run's result as benchmarks/run.py records it (and writes to its JSON file).
Run = dict[str, Any]


def fmt(v: float | None, digits: int = 0) -> str:
    """A number with thousands separators, or an en dash for none."""
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


#: How far frames per request may be from the workload's (benchmarks/run.py checks it).
FRAMES_TOLERANCE = 0.01


def frames_short(r: Run) -> bool:
    """The clients got > 1 % fewer frames per request than the workload sends: broadcasts lost."""
    got, expected = r.get("frames_per_request"), r.get("expected_frames")
    return got is not None and bool(expected) and got < (1 - FRAMES_TOLERANCE) * expected


def frames_over(r: Run) -> bool:
    """> 1 % more frames per request than the workload sends.

    No broadcast is missing, but the window's frames and acks do not pair up: events
    reach the other members before the sender's ack, so when the rate drifts within the
    window (a shared machine; latencies of ~1 s) the counts drift apart. Marked, kept.
    """
    got, expected = r.get("frames_per_request"), r.get("expected_frames")
    return got is not None and bool(expected) and got > (1 + FRAMES_TOLERANCE) * expected


def ok(r: Run) -> bool:
    """At least one ack in the window, and every broadcast delivered (frames per request)."""
    return bool(r["figures"]) and r["figures"].get("acks", 0) > 0 and not frames_short(r)


def acks_per_cpu_s(r: Run) -> float | None:
    """Acks in the window per server CPU-second in the window."""
    acks = r["figures"].get("acks")
    return acks / r["server_cpu_s"] if acks and r["server_cpu_s"] else None


def cpu_us_per_request(r: Run) -> float | None:
    """Server CPU microseconds per acknowledged request."""
    acks = r["figures"].get("acks")
    return 1e6 * r["server_cpu_s"] / acks if acks and r["server_cpu_s"] is not None else None


def kernel_percent(r: Run) -> float | None:
    """The kernel's share (stime) of the server's CPU over the window, in percent."""
    sys_s, cpu_s = r.get("server_sys_s"), r["server_cpu_s"]
    return 100 * sys_s / cpu_s if sys_s is not None and cpu_s else None


def percent_of_window(r: Run, cpu_s: float | None) -> float | None:
    """CPU seconds as a percentage of one core over the window."""
    window = r["figures"].get("duration_s")
    return 100 * cpu_s / window if cpu_s is not None and window else None


def load(r: Run) -> str:
    """``closed`` or the open-loop offered rate with its share of the reference rate."""
    if r["rate"] is None:
        return "closed"
    return f"{fmt(r['rate'])}/s ({100 * r['fraction']:.0f} %)"


def markdown(head: list[str], rows: Iterable[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.extend("| " + " | ".join(cells).replace("\n", " ") + " |" for cells in rows)
    return "\n".join(lines)


def every_run(results: list[Run]) -> str:
    """One row per run."""
    head = [
        "client", "connections", "load", "server", "round", "acks/s", "frames/request", "p50 ms",
        "p99 ms", "p99.9 ms", "peak RSS MiB", "server CPU %", "CPU µs/request", "kernel %", "acks per CPU-s",
        "generator CPU %", "load avg before/after", "errors", "note",
    ]  # fmt: skip
    rows = []
    for r in results:
        f = r["figures"]
        rows.append([
            r["client"], f"{r['connections']:,}", load(r), r["server"], str(r["run"]),
            fmt(f.get("acks_per_s")), fmt(r.get("frames_per_request"), 2), fmt(f.get("p50_ms"), 1),
            fmt(f.get("p99_ms"), 1), fmt(f.get("p999_ms"), 1), fmt(r["peak_rss_mib"]),
            fmt(percent_of_window(r, r["server_cpu_s"])), fmt(cpu_us_per_request(r), 1),
            fmt(kernel_percent(r)), fmt(acks_per_cpu_s(r)), fmt(percent_of_window(r, r["gen_cpu_s"])),
            f"{fmt(r.get('load_before'), 2)} / {fmt(r.get('load_after'), 2)}",
            str(f.get("errors", "–")), r["note"].replace("|", "/"),
        ])  # fmt: skip
    return markdown(head, rows)


def spread(values: list[float], digits: int = 0) -> str:
    """Median (min–max) of ``values``."""
    if not values:
        return "–"
    median = statistics.median(values)
    return f"{fmt(median, digits)} ({fmt(min(values), digits)}–{fmt(max(values), digits)})"


def groups(results: list[Run]) -> list[tuple[tuple[Any, ...], list[Run]]]:
    """The runs by (client, connections, load, server), in the order they first ran."""
    keyed: dict[tuple[Any, ...], list[Run]] = {}
    for r in results:
        keyed.setdefault((r["client"], r["connections"], r["fraction"], r["server"]), []).append(r)
    return list(keyed.items())


def medians(results: list[Run]) -> str:
    """Median (min–max) over the rounds of each client, connection count, load and server."""
    head = [
        "client", "connections", "load", "server", "rounds", "acks/s", "CPU µs/request", "kernel %",
        "acks per CPU-s", "p50 ms", "p99 ms", "p99.9 ms", "peak RSS MiB", "generator CPU %",
        "generator-bound rounds",
    ]  # fmt: skip
    rows = []
    for (client, conns, _, server), runs in groups(results):
        good = [r for r in runs if ok(r)]
        if not good:
            rows.append([client, f"{conns:,}", load(runs[0]), server, "0", "failed", *[""] * 9])
            continue

        def of(value: Callable[[Run], float | None], digits: int = 0, good: list[Run] = good) -> str:
            return spread([v for r in good if (v := value(r)) is not None], digits)

        rows.append([
            client, f"{conns:,}", load(good[0]), server, str(len(good)),
            of(lambda r: r["figures"]["acks_per_s"]), of(cpu_us_per_request, 1), of(kernel_percent),
            of(acks_per_cpu_s),
            of(lambda r: r["figures"].get("p50_ms"), 1), of(lambda r: r["figures"].get("p99_ms"), 1),
            of(lambda r: r["figures"].get("p999_ms"), 1), of(lambda r: r["peak_rss_mib"]),
            of(lambda r: percent_of_window(r, r["gen_cpu_s"])),
            str(sum(1 for r in good if r.get("generator_bound"))),
        ])  # fmt: skip
    return markdown(head, rows)


def syscalls(results: list[Run]) -> str:
    """Syscalls and context switches per request (``--perf``), medians over the rounds."""
    labels = [label for label, _ in perfstat.COLUMNS] + ["other", "all syscalls", "ctx switches"]
    head = ["client", "connections", "load", "server", *labels]
    rows = []
    for (client, conns, _, server), runs in groups(results):
        per = [perfstat.per_request(r["perf"], r["figures"].get("acks", 0)) for r in runs if r["perf"]]
        per = [p for p in per if p]
        if not per:
            continue
        cells = [fmt(statistics.median(p[label] for p in per), 2) for label in labels]
        rows.append([client, f"{conns:,}", load(runs[0]), server, *cells])
    return markdown(head, rows)
