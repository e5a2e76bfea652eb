"""The per-connection event order, without a server: feed events, check what runs next."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest
from warpsocket.codes import HandlerKind
from warpsocket.sequencer import Sequencer

OPEN, TEXT, BINARY, CLOSE, PRESENCE = HandlerKind


class Holds:
    """Stands in for the core queue's hold/release counts."""

    def __init__(self) -> None:
        self.count: Counter[int] = Counter()

    def hold(self, sid: int) -> None:
        self.count[sid] += 1

    def release(self, sid: int) -> None:
        assert self.count[sid] > 0, f"socket {sid} released more than it held"
        self.count[sid] -= 1

    def held(self) -> int:
        return sum(self.count.values())


def new_sequencer() -> tuple[Sequencer, Holds]:
    holds = Holds()
    return Sequencer(holds.hold, holds.release), holds


def drain_backlog(seq: Sequencer, sid: int) -> list[tuple[int, object]]:
    """Run what waits for sid, every handler synchronous; return the events in run order."""
    ran = []
    while (event := seq.next(sid)) is not None:
        kind, payload = event
        ran.append(event)
        seq.ran(kind, sid, False)
    return ran


def test_sync_handlers_run_at_once_and_hold_nothing():
    seq, holds = new_sequencer()
    for kind, payload in [(OPEN, None), (TEXT, "a"), (BINARY, b"b"), (CLOSE, None)]:
        assert seq.arrive(kind, 1, payload)
        seq.ran(kind, 1, False)
    assert holds.held() == 0
    assert seq.next(1) is None
    assert not seq.tracked


def test_events_wait_while_async_open_is_awaited_then_run_in_order():
    seq, holds = new_sequencer()
    assert seq.arrive(OPEN, 1, None)
    seq.ran(OPEN, 1, True)
    assert holds.count[1] == 1
    assert not seq.arrive(TEXT, 1, "a")
    assert not seq.arrive(BINARY, 1, b"b")
    assert not seq.arrive(CLOSE, 1, None)
    assert holds.count[1] == 4

    seq.finished(OPEN, 1)
    assert drain_backlog(seq, 1) == [(TEXT, "a"), (BINARY, b"b"), (CLOSE, None)]
    assert holds.held() == 0
    assert seq.next(1) is None
    assert not seq.tracked


def test_other_connections_go_on_while_one_awaits():
    seq, holds = new_sequencer()
    assert seq.arrive(TEXT, 1, "slow")
    seq.ran(TEXT, 1, True)
    assert not seq.arrive(TEXT, 1, "after slow")
    assert seq.arrive(TEXT, 2, "other")
    seq.ran(TEXT, 2, False)
    assert holds.count == Counter({1: 2})

    seq.finished(TEXT, 1)
    assert drain_backlog(seq, 1) == [(TEXT, "after slow")]
    assert holds.held() == 0
    assert not seq.tracked


def test_an_async_handler_from_the_backlog_keeps_the_rest_waiting():
    seq, holds = new_sequencer()
    assert seq.arrive(TEXT, 1, "a")
    seq.ran(TEXT, 1, True)
    assert not seq.arrive(TEXT, 1, "b")
    assert not seq.arrive(TEXT, 1, "c")

    seq.finished(TEXT, 1)
    assert seq.next(1) == (TEXT, "b")
    seq.ran(TEXT, 1, True)  # "b" is awaited in turn: still held, no second hold
    assert holds.count[1] == 2
    assert not seq.arrive(TEXT, 1, "d")  # new events queue behind "c"

    seq.finished(TEXT, 1)
    assert drain_backlog(seq, 1) == [(TEXT, "c"), (TEXT, "d")]
    assert holds.held() == 0
    assert not seq.tracked


def test_messages_after_a_failure_are_dropped_but_close_runs():
    seq, holds = new_sequencer()
    assert seq.arrive(TEXT, 1, "raises")
    seq.fail(1)
    seq.ran(TEXT, 1, False)
    assert not seq.arrive(TEXT, 1, "dropped")
    assert not seq.arrive(BINARY, 1, b"dropped")
    assert holds.held() == 0  # dropped at once: nothing waits
    assert seq.arrive(CLOSE, 1, None)
    seq.ran(CLOSE, 1, False)
    assert holds.held() == 0
    assert seq.next(1) is None
    assert not seq.tracked


def test_a_failure_drops_the_waiting_messages_and_releases_them():
    seq, holds = new_sequencer()
    assert seq.arrive(TEXT, 1, "times out")
    seq.ran(TEXT, 1, True)
    for payload in ("b", "c"):
        assert not seq.arrive(TEXT, 1, payload)
    assert not seq.arrive(CLOSE, 1, None)
    assert holds.count[1] == 4

    seq.fail(1)
    seq.finished(TEXT, 1)
    assert drain_backlog(seq, 1) == [(CLOSE, None)]
    assert holds.held() == 0
    assert not seq.tracked


def test_a_failure_in_the_backlog_drops_the_messages_behind_it():
    seq, holds = new_sequencer()
    assert seq.arrive(TEXT, 1, "a")
    seq.ran(TEXT, 1, True)
    for payload in ("raises", "dropped"):
        assert not seq.arrive(TEXT, 1, payload)
    assert not seq.arrive(CLOSE, 1, None)

    seq.finished(TEXT, 1)
    assert seq.next(1) == (TEXT, "raises")
    seq.fail(1)
    seq.ran(TEXT, 1, False)
    assert seq.next(1) == (CLOSE, None)
    seq.ran(CLOSE, 1, False)
    assert seq.next(1) is None
    assert holds.held() == 0
    assert not seq.tracked


def test_an_async_close_after_a_failure_is_awaited_and_released():
    seq, holds = new_sequencer()
    seq.fail(1)
    assert seq.arrive(CLOSE, 1, None)
    seq.ran(CLOSE, 1, True)
    assert holds.count[1] == 1
    seq.finished(CLOSE, 1)
    assert seq.next(1) is None
    assert holds.held() == 0
    assert not seq.tracked


def test_a_refused_open_leaves_nothing_held():
    seq, holds = new_sequencer()
    assert seq.arrive(OPEN, 1, None)
    seq.ran(OPEN, 1, True)
    assert not seq.arrive(TEXT, 1, "never runs")
    seq.forget(1)  # handle_open said no
    seq.finished(OPEN, 1)
    assert seq.next(1) is None
    assert holds.held() == 0
    assert not seq.tracked


BEHAVIOURS = ("ok", "raise", "async", "async-raise")


@pytest.mark.parametrize("seed", range(40))
def test_random_interleavings_keep_order_and_release_every_hold(seed):
    """Worker-like driving of random scripts, arrivals and completions interleaved at random."""
    rng = random.Random(seed)
    scripts: dict[int, list[tuple[int, str]]] = {}
    for sid in range(1, 5):
        messages = [(rng.choice((TEXT, BINARY)), rng.choice(BEHAVIOURS)) for _ in range(rng.randrange(6))]
        scripts[sid] = [(OPEN, rng.choice(("ok", "async"))), *messages, (CLOSE, rng.choice(BEHAVIOURS))]

    seq, holds = new_sequencer()
    log: dict[int, list[tuple[int, str]]] = defaultdict(list)
    awaited: list[tuple[int, int, str]] = []
    arrivals = {sid: list(script) for sid, script in scripts.items()}

    def run(sid: int, kind: int, behaviour: str, arrived: bool) -> bool:
        """Call the "handler" as the worker does; True if it is awaited."""
        assert all(s != sid for s, _, _ in awaited), "two handlers of one connection at once"
        log[sid].append((kind, behaviour))
        if behaviour == "raise" and kind != CLOSE:
            seq.fail(sid)
        is_async = behaviour.startswith("async")
        # Like Worker._on_events, skip ran() for a fresh event while nothing is tracked.
        if is_async or seq.tracked or not arrived:
            seq.ran(kind, sid, is_async)
        if is_async:
            awaited.append((sid, kind, behaviour))
        return is_async

    while any(arrivals.values()) or awaited:
        waiting = [sid for sid, events in arrivals.items() if events]
        if waiting and (not awaited or rng.random() < 0.6):
            sid = rng.choice(waiting)
            kind, behaviour = arrivals[sid].pop(0)
            if not seq.tracked or seq.arrive(kind, sid, behaviour):
                run(sid, kind, behaviour, arrived=True)
        else:
            sid, kind, behaviour = awaited.pop(rng.randrange(len(awaited)))
            if behaviour == "async-raise" and kind != CLOSE:
                seq.fail(sid)
            seq.finished(kind, sid)
            while (event := seq.next(sid)) is not None:
                if run(sid, event[0], event[1], arrived=False):
                    break

    for sid, script in scripts.items():
        failed_at = next(
            (i for i, (kind, b) in enumerate(script) if kind != CLOSE and b in ("raise", "async-raise")),
            None,
        )
        expected = script if failed_at is None else [*script[: failed_at + 1], script[-1]]
        assert log[sid] == expected, f"socket {sid}, script {script}"
    assert holds.held() == 0
    assert not seq.tracked


def test_presence_changes_after_an_awaited_close_still_run():
    seq, holds = new_sequencer()
    assert seq.arrive(CLOSE, 1, None)
    seq.ran(CLOSE, 1, True)
    assert not seq.arrive(PRESENCE, 1, ("room", "ada", False))
    seq.finished(CLOSE, 1)
    assert drain_backlog(seq, 1) == [(PRESENCE, ("room", "ada", False))]
    assert holds.held() == 0
    assert not seq.tracked


def test_presence_changes_behind_a_close_in_the_backlog_still_run():
    seq, holds = new_sequencer()
    assert seq.arrive(TEXT, 1, "slow")
    seq.ran(TEXT, 1, True)
    assert not seq.arrive(CLOSE, 1, None)
    assert not seq.arrive(PRESENCE, 1, ("room", "ada", False))
    seq.finished(TEXT, 1)
    assert drain_backlog(seq, 1) == [(CLOSE, None), (PRESENCE, ("room", "ada", False))]
    assert holds.held() == 0
    assert not seq.tracked


def test_presence_changes_of_a_failed_connection_are_not_dropped():
    seq, holds = new_sequencer()
    assert seq.arrive(TEXT, 1, "boom")
    seq.ran(TEXT, 1, True)
    seq.fail(1)
    assert not seq.arrive(TEXT, 1, "dropped")
    assert not seq.arrive(PRESENCE, 1, ("room", "ada", True))
    seq.finished(TEXT, 1)
    assert drain_backlog(seq, 1) == [(PRESENCE, ("room", "ada", True))]
    assert seq.arrive(PRESENCE, 1, ("room", "ada", False)), "a failure drops messages only"
    assert not seq.arrive(TEXT, 1, "still dropped")
    assert seq.arrive(CLOSE, 1, None)
    seq.ran(CLOSE, 1, False)
    assert holds.held() == 0
    assert not seq.tracked
