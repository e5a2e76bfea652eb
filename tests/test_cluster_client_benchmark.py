"""benchmarks/cluster_client.py keeps working: one round at tiny sizes, every message delivered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cluster_client.py"


@pytest.mark.timeout(120)
def test_cluster_client_benchmark_runs_at_tiny_sizes(redis: Any, tmp_path: Path) -> None:
    """Redis, a node and a receiver start; plain and history sends arrive once, in order.

    The ``redis`` fixture only stands for redis-server being installed (it skips, or fails
    under CI=1, when it is not); the script starts its own.
    """
    figures = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--messages", "3000", "--paced", "1000", "--rate", "500",
         "--rounds", "1", "--json", str(figures),
         # Pings every 0.2 s: the receiver must answer them or the node closes it (1011).
         "--node-arg=--ping-interval", "--node-arg=0.2", "--node-arg=--ping-timeout", "--node-arg=0.5"],
        capture_output=True,
        text=True,
        timeout=100,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for line in (
        "bench      throughput: sent 3000",
        "hist:bench throughput: sent 3000",
        "bench      retrying: sent 3000",
        "bench      latency at 500/s: sent 1000",
        "hist:bench latency at 500/s: sent 1000",
        "host: ",
        "every message send() took was delivered once, in order: True",
    ):
        assert line in done.stderr, f"{line!r} missing from:\n{done.stderr}"
    results = json.loads(figures.read_text())
    cases = ("throughput", "retrying", "latency")
    assert {(r["channel"], r["case"]) for r in results} == {
        (channel, case) for channel in ("bench", "hist:bench") for case in cases
    }
    for r in results:
        # Nothing refused at these sizes: the client's queue holds 65,536 messages.
        assert (r["refused"], r["received"], r["gaps"], r["backwards"]) == (0, r["sent"], 0, 0), r
    for r in results:
        if r["case"] != "latency":
            assert r["delivered_per_s"] > 0
            assert set(r["cpu_s"]) >= {"redis", "node", "receiver", "python sender", "client redis thread"}
    assert all(0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] for r in results if r["case"] == "latency")
