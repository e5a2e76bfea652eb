"""The soak benchmark (benchmarks/soak.py) for 60 seconds: churn, faults, exact delivery checks.

A real server in a subprocess (``warpsocket.start`` with benchmarks/soak_worker.py) and
asyncio ``websockets`` clients that subscribe directly and through prefixed virtual
sockets, do compare-and-set increments, vanish with an RST or an abort, are closed by
the server, stop reading (1008) or stop answering pings (1011). Any lost, duplicated or
reordered broadcast, wrong close code, handle_open/handle_close not run exactly once,
compare-and-set anomaly, state, thread or fd left behind fails the test; the report
lists each violation.

Alongside, recovering clients follow history channels across connections that they
drop at random (clean close, abort, RST, sometimes before the recover answered), and
recover from the last offset they saw: every offset is checked, across every reconnect,
and so is each ``recover`` result (``True`` on the channels that keep more than a
disconnect window, ``False`` counted and re-based on ``tiny0``, which keeps 16 messages).

Memory growth is only checked for gross leaks here: 60 seconds (40 after the warm-up)
on a shared 2-core machine are too short for a tight slope (a fresh process's RSS grows
in steps as the allocator and Python's arenas settle, which over 40 s reads as tens of
MB/h). 50 MB/h still catches a leak of ~1 KB per connection at this churn rate (about
20 connections per second); the 10-minute benchmark (docs/benchmarks.md, "Reliability")
is where the slope is measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from soak import MB, Settings, run_soak  # noqa: E402


@pytest.mark.timeout(300)
def test_soak_60_seconds_finds_no_violation():
    settings = Settings(
        duration=60,
        clients=32,
        rate=20,
        warmup=20,
        sample_every=2,
        max_growth=50 * MB,
        recoverers=12,
    )
    report = run_soak(settings)
    assert report.ok, report.summary()
    # The run tested something: every kind of client ran and was checked.
    assert report.connections > 200, report.summary()
    assert report.messages_checked > 10_000, report.summary()
    assert report.cas_checked > 0, report.summary()
    assert len(report.faults) == 4, report.summary()
    # Recovery across every kind of disconnect, both results, exact offsets.
    assert report.recovers["True"] > 50, report.summary()
    assert report.recovers["False"] > 0, report.summary()
    assert report.recovers["False on hist"] == 0, report.summary()
    assert report.recovers_interrupted > 0, report.summary()
    assert set(report.drops) == {"close", "abort", "rst"}, report.summary()
    assert report.history_checked > 5_000, report.summary()
    assert report.history_replayed > 0, report.summary()
    assert report.gaps == 0 and report.duplicates == 0, report.summary()
