"""benchmarks/presence.py keeps working: one round at tiny sizes, its report complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
        "heap per virtual socket",
        "heap left after untracking every socket:",
    ):
        assert line in done.stderr, f"{line!r} missing from:\n{done.stderr}"
