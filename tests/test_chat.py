"""The chat example (examples/chat/worker.py), end to end with the websockets client.

Servers run with threads=2, so consecutive connections land on different workers
(round-robin): everything two members see of each other crosses worker threads and
goes through channels, the rooms' history and presence. The last tests run the chat
as a cluster of two nodes on a real redis-server.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import threading
import time
from pathlib import Path

import pytest
import warpsocket
from helpers import connect, new_chat_room, wait_for
from websockets.exceptions import ConnectionClosed, InvalidStatus

ROOT = Path(__file__).resolve().parent.parent
CHAT_WORKER = ROOT / "examples" / "chat" / "worker.py"
# What README's command gives the chat: --history 'room:=50/86400'
CHAT_HISTORY = {"room:": warpsocket.History(50, 86400.0)}
STAMP = re.compile(r"^(\d+):")


class Chat:
    """One chat connection: sends JSON, reads ``(room, message)`` pairs."""

    def __init__(self, server, **kwargs):
        self.ws = connect(server, "/chat", **kwargs)
        self.id = None
        self.name = None
        self.seen = []  # everything received so far, as (room, message)
        self.backlog = []  # received but not yet taken by expect()

    def send(self, **message):
        self.ws.send(json.dumps(message))

    def _read(self, timeout):
        data = self.ws.recv(timeout=timeout)
        assert isinstance(data, str)
        if data.startswith("{"):
            item = (None, json.loads(data))
        else:
            room, sep, body = data.partition("|")
            assert sep, f"unroutable message {data!r}"
            stamp = STAMP.match(body)
            if stamp:
                # A chat message, stamped with its offset in the room's history: its id.
                msg = json.loads(body[stamp.end() :])
                assert msg["type"] == "message" and "id" not in msg, data
                item = (room, {**msg, "id": int(stamp.group(1))})
            else:
                item = (room, json.loads(body))
                assert item[1]["type"] != "message", f"unstamped chat message {data!r}"
        self.seen.append(item)
        return item

    def recv(self, timeout=20.0):
        """The next message in arrival order (those expect() skipped first)."""
        if self.backlog:
            return self.backlog.pop(0)
        return self._read(timeout)

    def expect(self, type_, room=None, timeout=20.0, **fields):
        """Take the first message of ``type_`` for ``room`` with ``fields``, waiting for it.

        Messages that do not match stay in the backlog for later calls.
        """

        def matches(item):
            got_room, msg = item
            return (
                msg.get("type") == type_
                and got_room == room
                and all(msg.get(k) == v for k, v in fields.items())
            )

        for i, item in enumerate(self.backlog):
            if matches(item):
                return self.backlog.pop(i)[1]
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {type_} {fields} for room {room}; seen {self.seen[-10:]}")
            try:
                item = self._read(timeout=remaining)
            except TimeoutError:
                continue
            if matches(item):
                return item[1]
            self.backlog.append(item)

    def hello(self, name):
        self.send(type="hello", name=name)
        welcome = self.expect("welcome")
        self.id, self.name = welcome["id"], welcome["name"]
        return welcome

    def join(self, room):
        """Join ``room``; the ``joined`` message (the room's history page stays in the backlog)."""
        self.send(type="join", room=room)
        return self.expect("joined", room)

    def join_with_history(self, room):
        """Join ``room`` for the first time: ``(joined, history page)``."""
        joined = self.join(room)
        return joined, self.expect("history", room)

    def messages_until(self, room, text, timeout=60.0):
        """Every chat message of ``room`` received until the one saying ``text`` (included)."""
        got = []
        while not got or got[-1]["text"] != text:
            got.append(self.expect("message", room, timeout=timeout))
        return got

    def close(self):
        self.ws.close()


@pytest.fixture
def chat_server(start_server):
    return start_server(worker=str(CHAT_WORKER), threads=2, history=CHAT_HISTORY)


@pytest.fixture
def clients(chat_server):
    """``clients(name=None, server=chat_server) -> Chat``, said hello as ``name``; closed at teardown."""
    opened = []

    def _open(name=None, server=chat_server, **kwargs):
        client = Chat(server, **kwargs)
        opened.append(client)
        if name is not None:
            client.hello(name)
        return client

    yield _open
    for client in opened:
        client.close()


def present(room):
    """The chat's users in ``room``, from presence (the member names; the chat sets no info)."""
    return sorted(warpsocket.presence(f"room:{room}"))


def presence_notes(client, room):
    """The ``(event, name)`` of every presence note ``client`` received for ``room`` so far."""
    return [(m["event"], m["name"]) for r, m in client.seen if r == room and m["type"] == "presence"]


def settled(first, second, room):
    """Return once every presence note the handlers of ``first`` caused so far reached
    ``second`` (both connected to this process).

    ``first``'s error reply comes after its earlier handlers, handle_presence included;
    a channel send reaches this process's subscribers at once, so a note sent by then
    is queued for ``second`` before the typing note it is asked for afterwards.
    """
    first.send(type="no such type")
    first.expect("error")
    second.send(type="typing", room=room)
    second.expect("typing", room, **{"from": second.id})


def test_members_are_spread_over_both_workers(chat_server, clients):
    clients("alice")
    clients("bob")
    wait_for(
        lambda: [w["connections"] for w in warpsocket.stats()["workers"]] == [1, 1],
        message="one connection per worker",
    )


def test_hello_then_join(clients):
    alice = clients()
    welcome = alice.hello("  Alice   Liddell ")
    assert welcome["name"] == "Alice Liddell"
    assert isinstance(welcome["id"], int) and welcome["id"] > 0
    room = new_chat_room()
    joined, page = alice.join_with_history(room)
    assert joined["members"] == ["Alice Liddell"]
    assert present(room) == ["Alice Liddell"]
    assert page["messages"] == []
    assert page["offset"] == 0
    assert isinstance(page["epoch"], str) and page["epoch"]


def test_broadcast_reaches_every_member_across_workers(clients):
    room = new_chat_room()
    alice, bob = clients("alice"), clients("bob")
    alice.join(room)
    joined = bob.join(room)
    assert joined["members"] == ["alice", "bob"]
    alice.expect("presence", room, event="join", name="bob")

    alice.send(type="say", room=room, text="hello bob")
    for client in (alice, bob):
        msg = client.expect("message", room)
        assert msg["text"] == "hello bob"
        assert msg["name"] == "alice"
        assert msg["from"] == alice.id
        assert msg["id"] == 1
        assert isinstance(msg["ts"], int)


def test_presence_is_kept_live_on_join_and_leave(clients):
    room = new_chat_room()
    alice, bob, carol = clients("alice"), clients("bob"), clients("carol")
    alice.join(room)
    alice.expect("presence", room, event="join", name="alice")  # her own arrival reaches her too
    assert bob.join(room)["members"] == ["alice", "bob"]
    alice.expect("presence", room, event="join", name="bob")
    assert carol.join(room)["members"] == ["alice", "bob", "carol"]
    for client in (alice, bob):
        client.expect("presence", room, event="join", name="carol")
    assert present(room) == ["alice", "bob", "carol"]

    bob.send(type="leave", room=room)
    assert bob.expect("left", room=None)["room"] == room
    for client in (alice, carol):
        client.expect("presence", room, event="leave", name="bob")
    assert present(room) == ["alice", "carol"]
    # Each change once, in the order it happened.
    assert presence_notes(alice, room) == [
        ("join", "alice"), ("join", "bob"), ("join", "carol"), ("leave", "bob")
    ]  # fmt: skip


def test_a_user_with_two_connections_is_one_member(clients):
    room = new_chat_room()
    bob = clients("bob")
    bob.join(room)
    bob.expect("presence", room, event="join", name="bob")
    first = clients("alice")
    first.join(room)
    bob.expect("presence", room, event="join", name="alice")
    second = clients("alice")  # another tab of alice's, on the other worker than the first
    assert second.join(room)["members"] == ["alice", "bob"]
    settled(second, bob, room)
    assert presence_notes(bob, room) == [("join", "bob"), ("join", "alice")]  # not twice

    # One tab leaves, the other stays: alice is still here and nobody is told otherwise.
    first.send(type="leave", room=room)
    first.expect("left")
    settled(first, bob, room)
    assert presence_notes(bob, room) == [("join", "bob"), ("join", "alice")]
    assert present(room) == ["alice", "bob"]

    # Her last tab goes: now she leaves, once.
    second.close()
    bob.expect("presence", room, event="leave", name="alice")
    assert present(room) == ["bob"]
    first.join(room)
    bob.expect("presence", room, event="join", name="alice")
    assert presence_notes(bob, room) == [
        ("join", "bob"), ("join", "alice"), ("leave", "alice"), ("join", "alice")
    ]  # fmt: skip


def test_leaving_stops_the_room_but_not_the_others(clients):
    room, other = new_chat_room(), new_chat_room()
    alice, bob = clients("alice"), clients("bob")
    for client in (alice, bob):
        client.join(room)
        client.join(other)
    bob.send(type="leave", room=room)
    bob.expect("left")
    alice.expect("presence", room, event="leave", name="bob")
    # Both sends come from alice's worker, so bob gets them in this order: the first
    # message he receives after leaving must be the one for the room he is still in.
    alice.send(type="say", room=room, text="bob is gone")
    alice.send(type="say", room=other, text="still here?")
    alice.expect("message", other, text="still here?")
    while True:
        got_room, msg = bob.recv()
        if msg["type"] == "message":
            break
    assert (got_room, msg["text"]) == (other, "still here?")


def test_one_connection_in_several_rooms_gets_prefixed_messages(clients):
    rooms = [new_chat_room() for _ in range(3)]
    alice, bob = clients("alice"), clients("bob")
    for room in rooms:
        alice.join(room)
        bob.join(room)
    for room in rooms:
        bob.send(type="say", room=room, text=f"in {room}")
    for room in rooms:
        assert alice.expect("message", room)["text"] == f"in {room}"


def test_history_keeps_the_last_50_messages(clients):
    room = new_chat_room()
    alice = clients("alice")
    alice.join(room)
    for i in range(60):
        alice.send(type="say", room=room, text=f"m{i}")
    alice.expect("message", room, text="m59", timeout=60)

    carol = clients("carol")
    _, page = carol.join_with_history(room)
    history = page["messages"]
    assert [m["text"] for m in history] == [f"m{i}" for i in range(10, 60)]
    assert [m["id"] for m in history] == list(range(11, 61))
    assert page["offset"] == 60
    assert all(m["name"] == "alice" and m["from"] == alice.id for m in history)
    assert warpsocket.get_key(f"chat:history:{room}") is None  # kept by the channel, not in kv
    # live messages go on from the page's offset
    alice.send(type="say", room=room, text="after the page")
    assert carol.expect("message", room)["id"] == 61


def test_concurrent_senders_on_different_workers_lose_no_message(clients):
    room = new_chat_room()
    senders = [clients(f"s{i}") for i in range(4)]
    for client in senders:
        client.join(room)
    per_sender = 10

    def talk(client):
        for j in range(per_sender):
            client.send(type="say", room=room, text=f"{client.name}-{j}")

    threads = [threading.Thread(target=talk, args=(c,)) for c in senders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for client in senders:
        for other in senders:
            client.expect("message", room, text=f"{other.name}-{per_sender - 1}", timeout=60)

    history = clients("late").join_with_history(room)[1]["messages"]
    assert len(history) == len(senders) * per_sender
    assert [m["id"] for m in history] == list(range(1, len(history) + 1))
    assert sorted(m["text"] for m in history) == sorted(
        f"{c.name}-{j}" for c in senders for j in range(per_sender)
    )
    # every sender's own messages keep their order
    for client in senders:
        mine = [m["text"] for m in history if m["from"] == client.id]
        assert mine == [f"{client.name}-{j}" for j in range(per_sender)]


# --------------------------------------------------------------------------
# reconnecting: recover() or a fresh history page
# --------------------------------------------------------------------------


def rejoin(clients, name, room, since, server=None):
    """A new connection for ``name`` joining ``room`` again from ``since``, as the page does."""
    client = clients(name) if server is None else clients(name, server=server)
    client.send(type="join", room=room, since=list(since))
    client.expect("joined", room)
    return client


def test_reconnect_gets_the_missed_messages_once_in_order(clients):
    room = new_chat_room()
    alice, bob = clients("alice"), clients("bob")
    _, page = alice.join_with_history(room)
    bob.join(room)
    for i in range(3):
        bob.send(type="say", room=room, text=f"before {i}")
    seen = alice.messages_until(room, "before 2")
    since = (page["epoch"], seen[-1]["id"])
    assert since[1] == 3
    alice.close()

    for i in range(5):
        bob.send(type="say", room=room, text=f"missed {i}")
    bob.expect("message", room, text="missed 4")
    again = rejoin(clients, "alice", room, since)
    bob.send(type="say", room=room, text="live")
    got = again.messages_until(room, "live")
    assert [(m["id"], m["text"]) for m in got] == [
        *((4 + i, f"missed {i}") for i in range(5)),
        (9, "live"),
    ]
    # recovered: no history page, nothing repeated
    assert [m["type"] for _, m in again.seen].count("history") == 0
    assert [m["id"] for _, m in again.seen if m["type"] == "message"] == list(range(4, 10))


def test_reconnect_while_the_room_is_busy_misses_nothing_and_repeats_nothing(clients):
    room = new_chat_room()
    alice, bob = clients("alice"), clients("bob")
    _, page = alice.join_with_history(room)
    bob.join(room)
    bob.send(type="say", room=room, text="first")
    since = (page["epoch"], alice.expect("message", room, text="first")["id"])
    alice.close()

    # bob talks on while alice's new connection recovers: the seam between the
    # replayed and the live messages must hold (at most 40 in flight: all kept).
    count = 40
    talk = threading.Thread(
        target=lambda: [bob.send(type="say", room=room, text=f"busy {i}") for i in range(count)]
    )
    talk.start()
    try:
        again = rejoin(clients, "alice", room, since)
    finally:
        talk.join()
    got = again.messages_until(room, f"busy {count - 1}")
    assert [m["text"] for m in got] == [f"busy {i}" for i in range(count)]
    # bob's own copies too (read, so that his client's queue lets it close promptly)
    assert bob.messages_until(room, f"busy {count - 1}")[-count:] == got
    assert [m["id"] for m in got] == list(range(2, count + 2))
    assert not any(m["type"] == "history" for _, m in again.seen)


def test_too_far_behind_gets_a_fresh_history_page(clients):
    room = new_chat_room()
    alice, bob = clients("alice"), clients("bob")
    _, page = alice.join_with_history(room)
    bob.join(room)
    alice.close()
    for i in range(60):  # more than the 50 kept: recover() cannot fill the gap
        bob.send(type="say", room=room, text=f"m{i}")
    bob.expect("message", room, text="m59", timeout=60)

    again = rejoin(clients, "alice", room, (page["epoch"], 0))
    fresh = again.expect("history", room)
    assert fresh["epoch"] == page["epoch"]
    assert fresh["offset"] == 60
    assert [m["text"] for m in fresh["messages"]] == [f"m{i}" for i in range(10, 60)]
    bob.send(type="say", room=room, text="live")
    assert again.expect("message", room)["id"] == 61


def test_a_restarted_server_has_a_new_epoch_and_sends_a_fresh_page(chat_server, start_server, clients):
    room = new_chat_room()
    alice, bob = clients("alice"), clients("bob")
    _, page = alice.join_with_history(room)
    bob.join(room)
    for i in range(3):
        bob.send(type="say", room=room, text=f"old {i}")
    since = (page["epoch"], alice.messages_until(room, "old 2")[-1]["id"])
    port = chat_server.port
    chat_server.stop(timeout=10)

    # A new process-like start on the same port: the history is gone, its epoch is new.
    restarted = start_server(
        worker=str(CHAT_WORKER), threads=2, history=CHAT_HISTORY, bind=f"127.0.0.1:{port}"
    )
    carol = clients("carol", server=restarted)
    carol.join(room)
    carol.send(type="say", room=room, text="new 0")
    carol.expect("message", room, text="new 0")

    again = rejoin(clients, "alice", room, since, server=restarted)
    fresh = again.expect("history", room)
    assert fresh["epoch"] != page["epoch"]
    assert fresh["offset"] == 1
    assert [(m["id"], m["text"]) for m in fresh["messages"]] == [(1, "new 0")]
    carol.send(type="say", room=room, text="new 1")
    assert [(m["id"], m["text"]) for m in again.messages_until(room, "new 1")] == [(2, "new 1")]


def test_a_bad_since_is_an_error(clients):
    client = clients("dave")
    room = new_chat_room()
    for since in ("epoch 3", ["e"], ["e", -1], ["", 1], ["e", True], [1, 2], ["e", 1.5]):
        client.send(type="join", room=room, since=since)
        assert "since" in client.expect("error")["message"]
    assert client.join(room)["members"] == ["dave"]


def test_the_chat_refuses_to_start_without_room_history(start_server):
    with pytest.raises(RuntimeError, match="--history 'room:=50/86400'"):
        start_server(worker=str(CHAT_WORKER))


def test_closing_the_connection_leaves_every_room(clients):
    room, other = new_chat_room(), new_chat_room()
    alice, bob = clients("alice"), clients("bob")
    for client in (alice, bob):
        client.join(room)
        client.join(other)
    bob.close()
    for r in (room, other):
        alice.expect("presence", r, event="leave", name="bob")
        assert present(r) == ["alice"]


def test_typing_indicator(clients):
    room = new_chat_room()
    alice, bob = clients("alice"), clients("bob")
    alice.join(room)
    bob.join(room)
    bob.send(type="typing", room=room)
    msg = alice.expect("typing", room)
    assert (msg["name"], msg["from"]) == ("bob", bob.id)


def test_bad_requests_get_an_error_and_keep_the_connection(clients):
    client = clients()
    client.send(type="join", room="lobby")
    assert "name" in client.expect("error")["message"]
    client.ws.send("not json")
    client.expect("error")
    client.send(type="dance")
    client.expect("error")
    client.hello("dave")
    client.send(type="join", room="No Spaces Allowed!")
    client.expect("error")
    client.send(type="join", room=["a list"])
    client.expect("error")
    client.send(type="say", room=new_chat_room(), text="not a member")
    client.expect("error")
    client.send(type="say", room={"x": 1}, text="bad room")
    client.expect("error")
    # still alive
    room = new_chat_room()
    assert client.join(room)["members"] == ["dave"]


# --------------------------------------------------------------------------
# Origin check
# --------------------------------------------------------------------------


def test_foreign_origin_is_refused_with_403(chat_server):
    with pytest.raises(InvalidStatus) as info:
        connect(chat_server, "/chat", origin="http://evil.example")
    assert info.value.response.status_code == 403


def test_same_host_other_port_is_refused(chat_server):
    with pytest.raises(InvalidStatus) as info:
        connect(chat_server, "/chat", origin=f"http://127.0.0.1:{chat_server.port + 1}")
    assert info.value.response.status_code == 403


def test_matching_origin_and_no_origin_are_accepted(chat_server):
    for origin in (f"http://127.0.0.1:{chat_server.port}", None):
        client = Chat(chat_server, origin=origin)
        try:
            assert client.hello("eve")["name"] == "eve"
        finally:
            client.close()


def test_refused_connection_never_reaches_the_chat(chat_server, clients):
    room = new_chat_room()
    alice = clients("alice")
    alice.join(room)
    for _ in range(3):
        with pytest.raises(InvalidStatus):
            connect(chat_server, "/chat", origin="https://attacker.example")
    alice.send(type="say", room=room, text="ping")
    alice.expect("message", room, text="ping")
    assert presence_notes(alice, room) == [("join", "alice")]
    assert warpsocket.stats()["connections"] == 1


@pytest.fixture(scope="module")
def chat_module():
    spec = importlib.util.spec_from_file_location("chat_worker_under_test", CHAT_WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("origin", "host", "ok"),
    [
        (None, "127.0.0.1:3000", True),
        ("http://127.0.0.1:3000", "127.0.0.1:3000", True),
        ("HTTP://Chat.Example.COM", "chat.example.com", True),
        ("http://chat.example.com", "chat.example.com:80", True),
        ("https://chat.example.com", "chat.example.com", True),
        ("https://chat.example.com:443", "chat.example.com", True),
        ("http://[::1]:3000", "[::1]:3000", True),
        ("http://127.0.0.1:3001", "127.0.0.1:3000", False),
        ("http://evil.example", "chat.example.com", False),
        ("http://chat.example.com.evil.example", "chat.example.com", False),
        ("https://chat.example.com", "chat.example.com:80", False),
        ("null", "chat.example.com", False),
        ("file://", "chat.example.com", False),
        ("http://chat.example.com", None, False),
        ("http://chat.example.com:bad", "chat.example.com", False),
    ],
)
def test_origin_rule(chat_module, origin, host, ok):
    assert chat_module.origin_allowed(origin, host) is ok


def test_extra_origins_from_worker_arg(start_server):
    server = start_server(
        worker=str(CHAT_WORKER),
        history=CHAT_HISTORY,
        worker_arg={"allowed_origins": ["https://app.example.com/"]},
    )
    client = Chat(server, origin="https://app.example.com")
    try:
        assert client.hello("frank")["name"] == "frank"
    finally:
        client.close()
    with pytest.raises(InvalidStatus) as info:
        connect(server, "/chat", origin="https://other.example.com")
    assert info.value.response.status_code == 403


def test_server_shutdown_closes_chat_clients(chat_server, clients):
    alice = clients("alice")
    alice.join(new_chat_room())
    chat_server.stop(timeout=10)
    with pytest.raises(ConnectionClosed):
        while True:
            alice.recv(timeout=20)


# --------------------------------------------------------------------------
# a cluster: presence across nodes, and the users of a node that dies
# --------------------------------------------------------------------------


@pytest.fixture
def chat_cluster(redis):
    """``(node_a, node_b, clients)``: two chat nodes on a real redis-server and a factory
    ``clients(name, node) -> Chat`` (said hello); everything stopped at teardown."""
    from test_cluster import Node

    nodes, opened = [], []
    try:
        for _ in range(2):
            nodes.append(Node(CHAT_WORKER, redis.url, "--history", "room:=50/86400"))

        def _open(name, node):
            client = Chat(node)
            opened.append(client)
            client.hello(name)
            return client

        yield nodes[0], nodes[1], _open
    finally:
        for client in opened:
            with contextlib.suppress(Exception):
                client.close()
        for node in nodes:
            node.stop()


@pytest.mark.timeout(180)
def test_cluster_a_user_on_two_nodes_is_one_member_and_a_dead_nodes_users_leave(chat_cluster, redis):
    a, b, clients = chat_cluster
    room = new_chat_room()
    bob = clients("bob", b)
    bob.join(room)
    bob.expect("presence", room, event="join", name="bob")
    alice_b = clients("alice", b)
    assert alice_b.join(room)["members"] == ["alice", "bob"]
    bob.expect("presence", room, event="join", name="alice")
    # alice's other tab, on the other node: she is here already, nobody is told again
    alice_a = clients("alice", a)
    assert alice_a.join(room)["members"] == ["alice", "bob"]
    carol = clients("carol", a)
    assert carol.join(room)["members"] == ["alice", "bob", "carol"]
    bob.expect("presence", room, event="join", name="carol")
    with warpsocket.Cluster(redis.url) as cluster:
        assert sorted(cluster.presence(f"room:{room}")) == ["alice", "bob", "carol"]

        a.kill()  # SIGKILL: node A says no goodbye, a live node takes its share back
        killed = time.monotonic()
        bob.expect("presence", room, event="leave", name="carol", timeout=30)
        assert time.monotonic() - killed < 20  # the promise is 15 s (12 s as built)
        # alice is still here through node B: only carol left, once
        assert sorted(cluster.presence(f"room:{room}")) == ["alice", "bob"]
    alice_b.expect("presence", room, event="leave", name="carol")
    alice_b.send(type="say", room=room, text="still here")
    bob.expect("message", room, text="still here")
    assert presence_notes(bob, room) == [
        ("join", "bob"), ("join", "alice"), ("join", "carol"), ("leave", "carol")
    ]  # fmt: skip
    assert presence_notes(alice_b, room) == presence_notes(bob, room)[1:]
