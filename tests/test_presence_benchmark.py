"""benchmarks/presence.py keeps working: one round at tiny sizes, its report complete.

The churn test's ``redis`` fixture skips it (or fails it under CI=1) without redis-server.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "presence.py"


def test_presence_benchmark_runs_at_tiny_sizes() -> None:
    """A fresh round process starts a server, tracks, counts, reads and untracks, and reports."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--members", "300", "--small", "50", "--calls", "300", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # The script logs to stderr; every figure the docs quote is there.
    for line in (
        "presence_count, 300 members: wall",
        "track (join, a change queued):",
        "untrack (leave, a change queued):",
        "track (a further tab, no change):",
        "call overhead: untrack(v, 'never')",
        "presence() of 50 members:",
        "heap per tracked socket:",
        "the same, tracked again",
        "heap per virtual socket",
        "heap left after untracking every socket:",
    ):
        assert line in done.stderr, f"{line!r} missing from:\n{done.stderr}"


@pytest.mark.timeout(180)
def test_churn_over_two_nodes_runs_at_tiny_sizes(redis: Any) -> None:
    """Two nodes on the fixture's Redis: every change reported once, presence_count the truth.

    ``--configs churn,noop,idle``: both baselines' lines come out, and the end checks (answers
    against the model, presence against the truth, every (channel, member) change counted
    on the nodes after every connection closed) pass.
    """
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "churn", "--redis-url", redis.url, "--connections", "60",
         "--rate", "150", "--channels", "6", "--seconds", "1.5", "--rounds", "1",
         "--configs", "churn,noop,idle"],
        capture_output=True,
        text=True,
        timeout=150,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for line in (
        "churn: ",
        "noop: ",
        "idle: ",
        "node CPU for presence (churn - noop",
        "node CPU for presence (churn - idle",
        "load generator: lowest rate",
        "pairs whose joins or leaves differ from the truth: 0;",
        "presence_count equal to the truth: yes",
        "verdict: PASS",
    ):
        assert line in done.stderr, f"{line!r} missing from:\n{done.stderr}"
    match = re.search(r"checks: ([\d,]+) changes in the truth .* reported ([\d,]+) ", done.stderr)
    assert match, done.stderr
    truth, reported = (int(group.replace(",", "")) for group in match.groups())
    assert truth == reported > 60, done.stderr
