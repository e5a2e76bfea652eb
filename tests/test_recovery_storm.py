"""A tiny recovery storm (benchmarks/recovery_storm.py), so that the script keeps working.

Two cluster nodes on a real redis-server, 200 ``websockets`` clients in 5 history channels,
200 messages/s; node A is SIGKILLed and its clients recover on node B. The script itself
checks every recover is True, no client saw a gap or a duplicate, and all were back within
5 s of the kill; this test runs it and reads its JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "recovery_storm.py"


@pytest.mark.timeout(120)
def test_a_small_storm_recovers_every_client_without_gap_or_duplicate(redis_installed, tmp_path):
    out = tmp_path / "storm.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--clients", "200", "--channels", "5", "--rate", "200",
         "--before", "1.5", "--after", "2", "--runs", "1", "--procs", "1", "--threads", "1",
         "--log-dir", str(tmp_path), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert out.exists(), done.stdout + done.stderr
    (run,) = json.loads(out.read_text())
    assert "error" not in run, run
    assert run["clients"] == 200 and run["moved"] == 100
    assert run["recovered_true"] == 100, run
    assert (run["gaps"], run["duplicates"], run["tail_missing"]) == (0, 0, 0), run
    assert run["client_errors"] == [], run
    assert run["published_after_kill"] > 0 and run["last_offsets_sum"] > 0
    # Every client saw every offset of its channel after the one it joined at.
    assert run["deliveries"] > 0 and run["back_s_max"] <= 5.0, run
    assert run["passed"], run
    assert done.returncode == 0, done.stdout + done.stderr
