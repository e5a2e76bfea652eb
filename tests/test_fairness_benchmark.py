"""benchmarks/fairness.py keeps working: one short round of a few configurations, its report complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "fairness.py"


def test_fairness_benchmark_runs_a_tiny_round() -> None:
    """Quiet, one flooder, rate-limited flooders (websockets and fast): each reported, closed with 1008."""
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
            "1ms:4",
            "echo:1",
            "1ms:1:100",
            "1ms:1f:100",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # The script logs to stderr; every figure the docs quote is there.
    for line in (
        "round 1 1ms:0 ",
        "round 1 1ms:4 ",
        "round 1 echo:1 ",
        "round 1 1ms:1:100 ",
        "round 1 1ms:1f:100 ",
        "medians over 1 rounds",
        "victim p50",
        "echoes/s",
        ", 1008)]",
    ):
        assert line in done.stderr, f"{line!r} missing from:\n{done.stderr}"
    # The 4-flooder run with the slow handler ends on time (its flooders stop at their
    # deadline though their sends are blocked) and reports what they sent.
    assert "flooders' process did not finish" not in done.stderr


def test_fairness_benchmark_refusal_cost() -> None:
    """--refusal-cost: the rate-limited run closes with 1008 and reports CPU per refused message."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--refusal-cost", "--rounds", "1", "--seconds", "0.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for line in (
        "round 1 limit 100 ",
        "round 1 no limit ",
        "closed 1008 after",
        "server CPU per refused message",
    ):
        assert line in done.stderr, f"{line!r} missing from:\n{done.stderr}"
