"""Presence (docs/api.md#presence): track, untrack, presence, presence_count, handle_presence.

A real server and real clients. The worker logs every handler call, with the worker
thread it ran on, to the file passed as ``worker_arg``; the tests wait for the lines
they expect and check their order.
"""

from __future__ import annotations

import contextlib
import json
import random

import pytest
import warpsocket
from helpers import LOGGING_PRELUDE, IdClient, read_lines, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

WORKER = (
    LOGGING_PRELUDE
    + """
import json, threading, time

def me():
    return f"{threading.current_thread().name}:{threading.get_ident()}"

def handle_open(socket_id, ip, headers):
    path = headers[":path"]
    if path.startswith("/track/"):
        _, _, channel, member = path.split("/")
        log("open-track", socket_id, warpsocket.track(socket_id, channel, member, "from open"))
    return True

def handle_text_message(text, socket_id):
    if text == "id":
        log("worker", socket_id, me())
        warpsocket.send(socket_id, str(socket_id))
    elif text.startswith("sleep "):
        time.sleep(float(text.split()[1]))

def handle_close(socket_id):
    log("close", socket_id, warpsocket.presence_count("room"))

def handle_presence(channel, member, joined):
    log("presence", json.dumps([repr(channel), member, joined, me()]))
"""
)

ASYNC_WORKER = (
    LOGGING_PRELUDE
    + """
import asyncio, json

def handle_text_message(text, socket_id):
    if text == "id":
        warpsocket.send(socket_id, str(socket_id))

async def handle_close(socket_id):
    # Awaits long enough that a change queued behind it would overtake it if it could.
    await asyncio.sleep(0.2)
    log("close", socket_id)

async def handle_presence(channel, member, joined):
    await asyncio.sleep(0)
    log("presence", json.dumps([repr(channel), member, joined, "async"]))
    if member == "boom":
        raise RuntimeError("boom")
"""
)

NO_SUCH_ID = 10**15 + 54321


@pytest.fixture
def server(start_server, log_path):
    return start_server(WORKER, threads=2, worker_arg=str(log_path))


def changes(log_path):
    """The logged presence changes: ``(line index, repr(channel), member, joined, worker)``."""
    out = []
    for i, line in enumerate(read_lines(log_path)):
        if line.startswith("presence "):
            channel, member, joined, worker = json.loads(line[len("presence ") :])
            out.append((i, channel, member, joined, worker))
    return out


def presence_lines(log_path):
    """The logged presence changes, as ``(repr(channel), member, joined)``."""
    return [change[1:4] for change in changes(log_path)]


def wait_change(log_path, channel, member, joined):
    """Wait for a logged change of ``member`` in ``channel`` (given as a str or bytes); return it."""
    key = (repr(channel), member, joined)
    return wait_for(lambda: next((c for c in changes(log_path) if c[1:4] == key), None), message=repr(key))


def wait_line(log_path, prefix):
    """Wait until a logged line starts with ``prefix``; return its index."""
    return (
        wait_for(
            lambda: next(
                (i + 1 for i, line in enumerate(read_lines(log_path)) if line.startswith(prefix)), None
            ),
            message=repr(prefix),
        )
        - 1
    )


def worker_of(log_path, sid):
    return next(line.split()[2] for line in read_lines(log_path) if line.startswith(f"worker {sid} "))


def members():
    return warpsocket.stats()["presence_members"]


def test_two_sockets_of_one_member_join_once_and_leave_with_the_last(make_client, log_path):
    base = members()
    a, b = make_client(), make_client()
    assert worker_of(log_path, a.sid) != worker_of(log_path, b.sid), "round robin over 2 workers"
    assert warpsocket.track(a.sid, "room", "ada", "tab a") is True
    assert warpsocket.track(b.sid, b"room", "ada", b"tab b") is False
    assert warpsocket.presence("room") == {"ada": b"tab b"}, "the latest track's info"
    assert warpsocket.presence_count(b"room") == 1
    assert members() == base + 1
    joined = wait_change(log_path, "room", "ada", True)

    a.close()
    closed_a = wait_line(log_path, f"close {a.sid} ")
    assert warpsocket.presence("room") == {"ada": b"tab b"}
    b.close()
    closed_b = wait_line(log_path, f"close {b.sid} ")
    left = wait_change(log_path, "room", "ada", False)
    assert joined[0] < closed_a < closed_b < left[0], "left after the last socket's handle_close"
    assert read_lines(log_path)[closed_b] == f"close {b.sid} 0", "untracked before handle_close runs"
    assert presence_lines(log_path) == [("'room'", "ada", True), ("'room'", "ada", False)]
    assert joined[4] == worker_of(log_path, a.sid), "on the worker of the socket that joined"
    assert left[4] == worker_of(log_path, b.sid), "on the worker of the socket that closed"
    assert (warpsocket.presence("room"), warpsocket.presence_count("room")) == ({}, 0)
    assert members() == base


def test_virtual_sockets_are_tracked_apart_from_their_connection(make_client, log_path):
    a = make_client()
    v1 = warpsocket.create_virtual_socket(a.sid)
    v2 = warpsocket.create_virtual_socket(a.sid, "p:")
    assert warpsocket.track(a.sid, "room", "ada") is True
    assert warpsocket.track(v1, "room", "bob", "v1") is True
    assert warpsocket.track(v2, "room", "bob", "v2") is False
    assert warpsocket.presence("room") == {"ada": None, "bob": "v2"}
    assert warpsocket.delete_virtual_socket(v1) is True
    assert warpsocket.presence_count("room") == 2, "bob is still there through v2"
    assert warpsocket.untrack(v2, "room") is True
    assert warpsocket.untrack(v2, "room") is False, "no longer tracked"
    assert warpsocket.presence("room") == {"ada": None}

    # A virtual socket that stops resolving (a socket it points at is deleted) is untracked.
    v3 = warpsocket.create_virtual_socket(a.sid)
    v4 = warpsocket.create_virtual_socket(v3)
    assert warpsocket.track(v4, "hall", "cy") is True
    assert warpsocket.delete_virtual_socket(v3) is True
    assert warpsocket.presence_count("hall") == 0
    assert warpsocket.untrack(a.sid, "room") is True
    wait_change(log_path, "room", "ada", False)
    wait_change(log_path, "hall", "cy", False)
    assert presence_lines(log_path) == [
        ("'room'", "ada", True),
        ("'room'", "bob", True),
        ("'room'", "bob", False),
        ("'hall'", "cy", True),
        ("'hall'", "cy", False),
        ("'room'", "ada", False),
    ]
    worker = worker_of(log_path, a.sid)
    assert {c[4] for c in changes(log_path)} == {worker}, (
        "a virtual socket's changes run on its connection's worker"
    )


def test_tracking_again_replaces_the_member_and_its_info(make_client, log_path):
    a = make_client()
    assert warpsocket.track(a.sid, "room", "ada", "x") is True
    assert warpsocket.track(a.sid, "room", "ada") is False
    assert warpsocket.presence("room") == {"ada": None}
    assert warpsocket.track(a.sid, "room", "bob", bytearray(b"b")) is True
    assert warpsocket.presence("room") == {"bob": b"b"}
    assert warpsocket.untrack(a.sid, "room") is True
    assert warpsocket.untrack(a.sid, "room") is False
    wait_change(log_path, "room", "bob", False)
    assert presence_lines(log_path) == [
        ("'room'", "ada", True),
        ("'room'", "ada", False),
        ("'room'", "bob", True),
        ("'room'", "bob", False),
    ]


def test_presence_values_info_types_and_channel_names(server, make_client, log_path):
    a = make_client()
    for member, info in [
        ("s", "text"),
        ("b", b"\x00\xff"),
        ("ba", bytearray(b"ba")),
        ("m", memoryview(b"mv")),
    ]:
        assert warpsocket.track(warpsocket.create_virtual_socket(a.sid), "kinds", member, info)
    assert warpsocket.track(a.sid, "kinds", "none")
    assert warpsocket.presence(b"kinds") == {
        "s": "text",
        "b": b"\x00\xff",
        "ba": b"ba",
        "m": b"mv",
        "none": None,
    }
    assert warpsocket.presence_count("kinds") == 5
    assert warpsocket.presence("nobody here") == {}
    # A channel name that is not UTF-8 reaches handle_presence as bytes.
    assert warpsocket.track(a.sid, b"\xff\xfe", "ada")
    wait_change(log_path, b"\xff\xfe", "ada", True)
    assert warpsocket.presence(b"\xff\xfe") == {"ada": None}
    # Tracked from handle_open, before the upgrade is answered.
    c = IdClient(server, "/track/lobby/cy")
    try:
        assert f"open-track {c.sid} True" in read_lines(log_path)
        assert warpsocket.presence("lobby") == {"cy": "from open"}
    finally:
        c.close()
    wait_change(log_path, "lobby", "cy", False)


def test_bad_arguments_raise_and_name_them(make_client):
    a = make_client()
    cases = [
        (lambda: warpsocket.track("1", "c", "m"), TypeError, "target"),
        (lambda: warpsocket.track(True, "c", "m"), TypeError, "target"),
        (lambda: warpsocket.track(0, "c", "m"), ValueError, "target"),
        (lambda: warpsocket.track(NO_SUCH_ID, "c", "m"), ValueError, "target"),
        (lambda: warpsocket.track(a.sid, 5, "m"), TypeError, "channel"),
        (lambda: warpsocket.track(a.sid, "\ud800", "m"), ValueError, "channel"),
        (lambda: warpsocket.track(a.sid, "c", ""), ValueError, "member"),
        (lambda: warpsocket.track(a.sid, "c", b"m"), TypeError, "member"),
        (lambda: warpsocket.track(a.sid, "c", None), TypeError, "member"),
        (lambda: warpsocket.track(a.sid, "c", "\udc80"), ValueError, "member"),
        (lambda: warpsocket.track(a.sid, "c", "m", 5), TypeError, "info"),
        (lambda: warpsocket.track(a.sid, "c", "m", "\ud800"), ValueError, "info"),
        (lambda: warpsocket.untrack(None, "c"), TypeError, "target"),
        (lambda: warpsocket.untrack(-1, "c"), ValueError, "target"),
        (lambda: warpsocket.untrack(a.sid, [1]), TypeError, "channel"),
        (lambda: warpsocket.presence(None), TypeError, "channel"),
        (lambda: warpsocket.presence_count(1.5), TypeError, "channel"),
    ]
    for call, error, name in cases:
        with pytest.raises(error, match=name):
            call()
    assert warpsocket.presence_count("c") == 0, "nothing tracked by a failed call"
    assert warpsocket.untrack(NO_SUCH_ID, "c") is False, "an unknown socket is tracked nowhere"
    v = warpsocket.create_virtual_socket(a.sid)
    warpsocket.delete_virtual_socket(v)
    with pytest.raises(ValueError, match="target"):
        warpsocket.track(v, "c", "m")
    sid = a.sid
    a.close()
    wait_for(lambda: warpsocket.send(sid, "x") == 0, message="the socket gone")
    with pytest.raises(ValueError, match="target"):
        warpsocket.track(sid, "c", "m")


def test_async_handlers_run_in_order_and_a_raising_one_is_only_logged(start_server, log_path, warpsocket_log):
    server = start_server(ASYNC_WORKER, threads=1, worker_arg=str(log_path))
    a, b = IdClient(server), IdClient(server)
    try:
        assert warpsocket.track(a.sid, "room", "ada")
        assert warpsocket.track(b.sid, "room", "boom")
        wait_for(lambda: warpsocket_log.errors_containing("handle_presence"), message="the error logged")
        assert b.received() == [], "b stays open"
        a.close()
        closed = wait_line(log_path, f"close {a.sid}")
        left = wait_change(log_path, "room", "ada", False)
        assert closed < left[0], "after the awaited handle_close"
        assert warpsocket.track(b.sid, "room", "ada"), "ada joins again"
        wait_for(lambda: presence_lines(log_path).count(("'room'", "ada", True)) == 2)
    finally:
        with contextlib.suppress(Exception):
            b.close()


def test_changes_alternate_under_random_operations(start_server, log_path):
    # One worker: every change runs on it, in the order it happened.
    server = start_server(WORKER, threads=1, worker_arg=str(log_path))
    clients = [IdClient(server) for _ in range(3)]
    sockets = [c.sid for c in clients] + [warpsocket.create_virtual_socket(c.sid) for c in clients]
    rng = random.Random(7)
    tracked: dict[tuple[int, str], str] = {}

    def present(channel):
        return {m for (_, c), m in tracked.items() if c == channel}

    for _ in range(600):
        sid, channel = rng.choice(sockets), rng.choice(["r1", "r2"])
        if rng.random() < 0.6:
            member = rng.choice(["ada", "bob"])
            assert warpsocket.track(sid, channel, member) is (member not in present(channel))
            tracked[(sid, channel)] = member
        else:
            member = tracked.pop((sid, channel), None)
            assert warpsocket.untrack(sid, channel) is (member is not None and member not in present(channel))
        for name in ("r1", "r2"):
            assert set(warpsocket.presence(name)) == present(name)
            assert warpsocket.presence_count(name) == len(present(name))
    for client in clients:
        client.close()
    # The last change of every (channel, member) still present is its leave.
    still = {(repr(c), m) for (_, c), m in tracked.items()}
    wait_for(lambda: last_changes(log_path, still), message="every leave")
    assert warpsocket.presence_count("r1") == warpsocket.presence_count("r2") == 0


def last_changes(log_path, pairs):
    """True once the last logged change of each of ``pairs`` is a leave; asserts they alternate."""
    last: dict[tuple[str, str], bool] = {}
    for channel, member, joined in presence_lines(log_path):
        assert last.get((channel, member), False) != joined, f"{channel} {member} alternates"
        last[(channel, member)] = joined
    return not any(last.get(pair, True) for pair in pairs) and not any(last.values())


@pytest.mark.timeout(120)
def test_a_retired_workers_changes_run_on_its_replacement(start_server, log_path):
    server = start_server(WORKER, threads=2, worker_arg=str(log_path), hang_timeout=1.0)
    a = IdClient(server)
    try:
        hung = worker_of(log_path, a.sid)
        assert warpsocket.track(a.sid, "room", "ada")
        wait_change(log_path, "room", "ada", True)
        a.ws.send("sleep 4")
        # Retired after 1 s: its connection is closed with 1011, and the replacement
        # runs the close and the presence change it causes.
        left = wait_change(log_path, "room", "ada", False)
        assert left[4] != hung
        assert wait_line(log_path, f"close {a.sid} ") < left[0]
    finally:
        with contextlib.suppress(Exception):
            a.close()


@pytest.mark.timeout(180)
def test_the_four_functions_take_any_value(start_server, log_path):
    server = start_server(WORKER, threads=1, worker_arg=str(log_path))
    client = IdClient(server)
    virtual = warpsocket.create_virtual_socket(client.sid)
    ids = st.sampled_from([client.sid, virtual, NO_SUCH_ID, 0, -1, 2**64])
    names = st.one_of(
        st.text(max_size=4),
        st.binary(max_size=4),
        st.binary(max_size=4).map(bytearray),
        st.sampled_from(["", "c"]),
    )
    anything = st.one_of(
        ids,
        names,
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.sampled_from(["\ud800", "x\udfff", [1], (), {}, object()]),
    )
    functions = {
        warpsocket.track: ("target", "channel", "member", "info"),
        warpsocket.untrack: ("target", "channel"),
        warpsocket.presence: ("channel",),
        warpsocket.presence_count: ("channel",),
    }

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        function = data.draw(st.sampled_from(list(functions)), label="function")
        params = functions[function]
        required = 3 if function is warpsocket.track else len(params)
        args = [data.draw(st.one_of(ids, names, anything), label=name) for name in params[:required]]
        if function is warpsocket.track and data.draw(st.booleans(), label="with info"):
            args.append(data.draw(anything, label="info"))
        try:
            result = function(*args)
        except (TypeError, ValueError) as exc:
            assert any(name in str(exc) for name in params), str(exc)
            return
        if function is warpsocket.presence:
            assert len(result) == warpsocket.presence_count(args[0])
            assert all(type(k) is str and (v is None or type(v) in (str, bytes)) for k, v in result.items())

    check()
    client.close()
    wait_for(lambda: members_of(client.sid, log_path), message="every change reported")
    assert warpsocket.stats()["presence_members"] == 0


def members_of(sid, log_path):
    """True once the closed client's close ran and every join since has its leave."""
    if not any(line.startswith(f"close {sid} ") for line in read_lines(log_path)):
        return False
    balance: dict[tuple[str, str], int] = {}
    for channel, member, joined in presence_lines(log_path):
        balance[(channel, member)] = balance.get((channel, member), 0) + (1 if joined else -1)
        assert balance[(channel, member)] in (0, 1), "alternates"
    return all(v == 0 for v in balance.values())


@pytest.mark.timeout(600)
def test_random_sequences_of_track_untrack_and_close_match_a_model(start_server, log_path):
    """Hypothesis: any sequence of track/untrack/virtual socket/close against a model.

    Each example gets two connections and channels of its own; after every step the
    returned values, ``presence`` and ``presence_count`` must be the model's. One worker
    thread: every change is reported on it in the order it happened, so at the end (every
    connection closed) each (channel, member)'s logged changes must be exactly the
    model's sequence.
    """
    server = start_server(WORKER, threads=1, worker_arg=str(log_path))
    examples = iter(range(10**6))
    operations = st.sampled_from(["track", "track", "untrack", "virtual", "close"])

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        n = next(examples)
        channels = [f"h{n}a", f"h{n}b"]
        clients = {c.sid: c for c in (IdClient(server) for _ in range(2))}
        owner = {sid: sid for sid in clients}  # open socket -> the connection it resolves to
        tracked: dict[tuple[int, str], tuple[str, object]] = {}  # (socket, channel) -> (member, info)
        info_of: dict[tuple[str, str], object] = {}  # (channel, member) -> its latest track's info
        expected: dict[tuple[str, str], list[bool]] = {}

        def present(channel):
            return {m for (_, c), (m, _) in tracked.items() if c == channel}

        def snapshot():
            return {c: present(c) for c in channels}

        def record(before):
            """Record the joins and leaves the model made since ``before``."""
            for c in channels:
                for m in before[c] - present(c):
                    expected.setdefault((c, m), []).append(False)
                    del info_of[(c, m)]
                for m in present(c) - before[c]:
                    expected.setdefault((c, m), []).append(True)

        def matches():
            return all(
                warpsocket.presence(c) == {m: info_of[(c, m)] for m in present(c)}
                and warpsocket.presence_count(c) == len(present(c))
                for c in channels
            )

        try:
            for _ in range(data.draw(st.integers(1, 25), label="steps")):
                kind = data.draw(operations, label="op")
                if not owner:
                    break
                if kind == "virtual":
                    on = data.draw(st.sampled_from(sorted(clients)), label="on")
                    if on in owner:
                        owner[warpsocket.create_virtual_socket(on)] = on
                    continue
                sid = data.draw(st.sampled_from(sorted(owner)), label="socket")
                channel = data.draw(st.sampled_from(channels), label="channel")
                if kind == "track":
                    member = data.draw(st.sampled_from(["ada", "bob"]), label="member")
                    info = data.draw(st.sampled_from([None, "x", b"y"]), label="info")
                    before = snapshot()
                    tracked[(sid, channel)] = (member, info)
                    record(before)
                    info_of[(channel, member)] = info
                    assert warpsocket.track(sid, channel, member, info) is (member not in before[channel])
                elif kind == "untrack":
                    before = snapshot()
                    had = tracked.pop((sid, channel), None)
                    record(before)
                    left = had is not None and had[0] not in present(channel)
                    assert warpsocket.untrack(sid, channel) is left
                else:  # close a connection (its virtual sockets go with it) or delete a virtual socket
                    gone = {s for s, o in owner.items() if o == sid} if sid in clients else {sid}
                    before = snapshot()
                    for key in [k for k in tracked if k[0] in gone]:
                        del tracked[key]
                    for s in gone:
                        del owner[s]
                    record(before)
                    if sid in clients:
                        clients[sid].close()
                    else:
                        assert warpsocket.delete_virtual_socket(sid)
                    with pytest.raises(ValueError):
                        warpsocket.track(sid, channel, "ada")
                wait_for(matches, timeout=10, message="presence as the model has it")
        finally:
            for client in clients.values():
                with contextlib.suppress(Exception):
                    client.close()
        before = snapshot()
        tracked.clear()
        record(before)
        wait_for(lambda: all(warpsocket.presence_count(c) == 0 for c in channels), message="all left")
        names = {repr(c): c for c in channels}

        def logged():
            found: dict[tuple[str, str], list[bool]] = {}
            for channel, member, joined in presence_lines(log_path):
                if channel in names:
                    found.setdefault((names[channel], member), []).append(joined)
            return found

        wait_for(lambda: logged() == expected, timeout=10, message=f"the changes {expected}")

    check()
    assert warpsocket.stats()["presence_members"] == 0
