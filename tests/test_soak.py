"""The soak benchmark (benchmarks/soak.py) for 60 seconds: churn, faults, exact delivery checks.

A real server in a subprocess (``warpsocket.start`` with benchmarks/soak_worker.py) and
asyncio ``websockets`` clients that subscribe directly and through prefixed virtual
sockets, do compare-and-set increments, vanish with an RST or an abort, are closed by
the server, stop reading (1008) or stop answering pings (1011). Any lost, duplicated or
reordered broadcast, wrong close code, handle_open/handle_close not run exactly once,
compare-and-set anomaly, state, thread or fd left behind fails the test; the report
lists each violation.

Clients also track themselves (and some of their virtual sockets) in presence channels;
every answer of ``track``/``untrack`` is checked, each member's changes must alternate in
``handle_presence``, and at the end the joins and leaves reported both equal the joins
the clients expected, with ``presence_count`` back to 0.

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

from soak import MB, HistoryStream, Report, Settings, run_soak  # noqa: E402


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
    # Presence: tracked connections and virtual sockets churned, every change reported once.
    assert report.presence_joins > 100, report.summary()
    assert report.untracks > 20, report.summary()
    assert report.after["joins"] == report.after["leaves"] == report.presence_joins, report.summary()


def test_history_checks_catch_gaps_duplicates_and_wrong_recover_results():
    """The recovering clients' checks are not vacuous: each kind of error is reported.

    No server: the soak's checker is fed the answers (``!rec`` words: result, since, epoch
    and position before, epoch and position after) and stamped offsets a broken server
    could send.
    """
    report = Report(Settings())
    stream = HistoryStream("s", "hist0", size=10)

    def recover(answer: str, *early: int) -> None:
        """One connection's recover: deliveries before its answer, then the answer."""
        stream.disconnected()
        stream.pending = []
        for offset in early:
            stream.deliver(offset, offset, report)
        stream.answered(answer.split(), report)

    recover("1 5 E 5 E 5", 6)  # first time, from position() = 5
    for offset in (7, 9, 9):
        stream.deliver(offset, offset, report)
    assert (report.gaps, report.duplicates, report.violation_count) == (1, 1, 2)
    assert report.history_checked == 4

    recover("1 9 E 12 E 12", 11, 12)  # True from 9, but the replay starts at 11
    assert (report.gaps, report.violation_count) == (2, 3)
    assert report.history_replayed == 2

    recover("0 12 E 14 E 14")  # 13 and 14 are kept (size 10): False is wrong
    assert report.violation_count == 4
    stream.deliver(15, 15, report)  # re-based: the first live one is right
    assert report.violation_count == 4

    recover("1 15 E 40 E 41")  # 16 is gone (the channel keeps 31 or 32 onwards): True is wrong
    assert report.violation_count == 5

    recover("0 15 E 60 E 60", 55)  # False must not replay: 61 expected
    assert (report.duplicates, report.violation_count) == (2, 6)

    recover("1 55 F 70 F 70")  # another epoch: True is wrong, and the epoch must not change
    assert report.violation_count == 8

    stream.deliver(56, 7, report)  # data that is not the stamped message
    assert report.violation_count == 9
    assert report.recovers == {"True": 4, "False": 2, "False on hist": 2}
