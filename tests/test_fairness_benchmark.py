"""benchmarks/fairness.py keeps working: one short round of a few configurations, its report complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "fairness.py"


def test_fairness_benchmark_runs_a_tiny_round() -> None:
    """Quiet, one flooder, and a rate-limited flooder: each reported, the flooder closed with 1008."""
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--rounds",
            "1",
            "--seconds",
            "0.5",
            "--warmup",
            "0.2",
            "--configs",
            "1ms:0",
            "echo:1",
            "1ms:1:100",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # The script logs to stderr; every figure the docs quote is there.
    for line in (
        "round 1 1ms:0 ",
        "round 1 echo:1 ",
        "round 1 1ms:1:100 ",
        "medians over 1 rounds",
        "victim p50",
        "echoes/s",
        "server CPU per refused message",
        ", 1008)]",
    ):
        assert line in done.stderr, f"{line!r} missing from:\n{done.stderr}"
