#!/usr/bin/env python3
"""Summarise an Autobahn fuzzing-client report (as written by kosoku) per case group.

Usage: autobahn_summary.py REPORT_DIR [--markdown] [--expect-groups 1,2,3]

Reads REPORT_DIR/index.json and the per-case JSON files next to it, prints one row per
group (OK / NON-STRICT / INFORMATIONAL / UNIMPLEMENTED / FAILED counts) and lists every
case that is not plainly OK. Exits 1 when a case FAILED (or could not run), when the
report is missing, or when an expected group has no case in it.

A case counts as FAILED when its message verdict ("behavior") is FAILED or ERROR, or
when its closing-handshake verdict ("behaviorClose") is not OK or INFORMATIONAL: that is
kosoku's `CaseResult.passed` rule, which is also Autobahn's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

GROUP_NAMES = {
    "1": "Framing",
    "2": "Pings/Pongs",
    "3": "Reserved bits",
    "4": "Opcodes",
    "5": "Fragmentation",
    "6": "UTF-8 handling",
    "7": "Close handling",
    "9": "Limits/performance",
    "10": "Miscellaneous",
    "12": "Compression (payloads)",
    "13": "Compression (parameters)",
}
VERDICTS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
CLOSE_ACCEPTABLE = {"OK", "INFORMATIONAL"}


def case_key(case_id: str) -> list[int]:
    """Sort key: ``1.2.10`` after ``1.2.9``."""
    return [int(part) for part in case_id.split(".")]


def verdict(entry: dict) -> str:
    """One verdict per case from its index entry (see the module docstring)."""
    behavior = entry.get("behavior")
    if behavior in ("FAILED", "ERROR") or entry.get("behaviorClose") not in CLOSE_ACCEPTABLE:
        return "FAILED"
    if behavior in VERDICTS:
        return behavior
    return "FAILED"


def load(report_dir: Path) -> dict[str, dict]:
    """Case id -> index entry, with the per-case report under ``detail``."""
    index_path = report_dir / "index.json"
    if not index_path.is_file():
        raise SystemExit(f"autobahn: no report at {index_path}")
    index = json.loads(index_path.read_text())
    cases: dict[str, dict] = {}
    for agent_cases in index.values():  # one agent: the server under test
        for case_id, entry in agent_cases.items():
            detail = {}
            report_file = report_dir / entry.get("reportfile", "")
            if report_file.is_file():
                detail = json.loads(report_file.read_text())
            cases[case_id] = {**entry, "detail": detail, "verdict": verdict(entry)}
    return cases


def table(cases: dict[str, dict], markdown: bool) -> list[str]:
    """Lines of the per-group table, with a total row."""
    per_group: dict[str, Counter] = defaultdict(Counter)
    duration: Counter = Counter()
    for case_id, case in cases.items():
        group = case_id.split(".")[0]
        per_group[group][case["verdict"]] += 1
        duration[group] += case.get("duration") or 0
    header = ["group", "name", "cases", *VERDICTS, "time (s)"]
    rows = []
    total: Counter = Counter()
    for group in sorted(per_group, key=int):
        counts = per_group[group]
        total.update(counts)
        rows.append(
            [group, GROUP_NAMES.get(group, "?"), str(sum(counts.values()))]
            + [str(counts[v]) for v in VERDICTS]
            + [f"{duration[group] / 1000:.1f}"]
        )
    rows.append(
        ["total", "", str(sum(total.values()))]
        + [str(total[v]) for v in VERDICTS]
        + [f"{sum(duration.values()) / 1000:.1f}"]
    )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return lines
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header)] + [fmt.format(*row) for row in rows]


def notable(cases: dict[str, dict], markdown: bool) -> list[str]:
    """Lines describing every case whose verdict is not OK."""
    lines = []
    for case_id in sorted(cases, key=case_key):
        case = cases[case_id]
        if case["verdict"] == "OK":
            continue
        detail = case["detail"]
        code = case.get("remoteCloseCode")
        reason = detail.get("remoteCloseReason")
        close = f"server close {code}" + (f" ({reason})" if reason else "")
        result = detail.get("result", "")
        if markdown:
            lines.append(
                f"| {case_id} | {case['verdict']} | {case.get('behaviorClose')} | {close} | {result} |"
            )
        else:
            lines.append(
                f"  {case_id:<8} {case['verdict']:<13} close={case.get('behaviorClose')}; {close}; {result}"
            )
    if markdown and lines:
        lines = [
            "| case | verdict | close verdict | server close | kosoku says |",
            "|---|---|---|---|---|",
            *lines,
        ]
    return lines


def main() -> int:
    """Print the summary; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report_dir", type=Path)
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument(
        "--expect-groups",
        default="",
        help="comma-separated groups that must have run (e.g. 1,2,3,4,5,6,7,9,10)",
    )
    args = parser.parse_args()

    cases = load(args.report_dir)
    if not cases:
        print("autobahn: the report holds no cases", file=sys.stderr)
        return 1
    print("\n".join(table(cases, args.markdown)))
    details = notable(cases, args.markdown)
    if details:
        print()
        if not args.markdown:
            print("Cases that are not plainly OK:")
        print("\n".join(details))

    status = 0
    failed = [c for c in sorted(cases, key=case_key) if cases[c]["verdict"] == "FAILED"]
    if failed:
        print(f"\nautobahn: {len(failed)} case(s) FAILED: {' '.join(failed)}", file=sys.stderr)
        status = 1
    ran = {c.split(".")[0] for c in cases}
    missing = [g for g in filter(None, args.expect_groups.split(",")) if g not in ran]
    if missing:
        print(f"autobahn: no results for group(s) {', '.join(missing)}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
