"""Channels: warpsocket.send to channels, subscribe / unsubscribe, has_subscriptions, stats.

Each test runs a real server.  Clients learn their socket id by sending "id"; the test
then drives warpsocket.* from its own thread (or asks the worker to do it from inside
a handler) and checks exactly what every client receives.  "Nothing else arrived" is
checked with a sentinel: the test sends a unique message straight to the socket after
the messages under test, and everything read before that sentinel must be exactly the
expected messages (messages sent from one thread to one connection keep their order).
"""

from __future__ import annotations

import pytest
import warpsocket
from helpers import IdClient, ask, connect, wait_for
from websockets.exceptions import InvalidStatus

CHANNEL_WORKER = """
import warpsocket

def handle_open(socket_id, ip, headers):
    path = headers.get(":path", "/")
    if path.startswith("/join/"):
        for ch in path[len("/join/"):].split(","):
            warpsocket.subscribe(socket_id, ch)
    if path.startswith("/refuse/"):
        for ch in path[len("/refuse/"):].split(","):
            warpsocket.subscribe(socket_id, ch)
        warpsocket.set_key(f"refused-sid:{path}", str(socket_id))
        return False
    return True

def handle_text_message(text, socket_id):
    cmd, _, rest = text.partition(" ")
    if cmd == "id":
        warpsocket.send(socket_id, str(socket_id))
    elif cmd == "sub":
        r = warpsocket.subscribe(socket_id, rest)
        warpsocket.send(socket_id, "sub " + ",".join(str(x) for x in r))
    elif cmd == "unsub":
        r = warpsocket.unsubscribe(socket_id, rest)
        warpsocket.send(socket_id, "unsub " + ",".join(str(x) for x in r))
    elif cmd == "bcast":
        ch, _, msg = rest.partition(" ")
        n = warpsocket.send(ch, msg)
        warpsocket.send(socket_id, f"sent {n}")
    elif cmd == "bcastbin":
        ch, _, msg = rest.partition(" ")
        n = warpsocket.send(ch, msg.encode())
        warpsocket.send(socket_id, f"sent {n}")
    elif cmd == "has":
        warpsocket.send(socket_id, "has " + str(warpsocket.has_subscriptions(rest)))
    else:
        warpsocket.send(socket_id, text)

def handle_binary_message(data, socket_id):
    warpsocket.send(socket_id, data)

def handle_close(socket_id):
    own = f"own:{socket_id}"
    warpsocket.set_key(f"closed:{socket_id}", "1" if warpsocket.has_subscriptions(own) else "0")
    warpsocket.set_key(
        f"closed-send:{socket_id}",
        str(warpsocket.send(own, "x") + warpsocket.send(socket_id, "x")),
    )
"""

NO_SUCH_ID = 10**15 + 12345


@pytest.fixture
def server(start_server):
    return start_server(CHANNEL_WORKER, threads=2)


def subs():
    return warpsocket.stats()["subscriptions"]


# ---------------------------------------------------------------- send to channels


def test_channel_send_reaches_each_subscriber_once(make_client):
    a, b, c = make_client(), make_client(), make_client()
    assert warpsocket.subscribe(a.sid, "room") == [a.sid]
    assert warpsocket.subscribe(b.sid, "room") == [b.sid]
    assert warpsocket.has_subscriptions("room") is True
    assert warpsocket.send("room", "hello") == 2
    assert a.received() == ["hello"]
    assert b.received() == ["hello"]
    assert c.received() == []


def test_send_to_unknown_channel_and_unknown_id_returns_zero(make_client):
    a = make_client()
    assert warpsocket.send("nobody-here", "x") == 0
    assert warpsocket.send(b"nobody-here", b"x") == 0
    assert warpsocket.send(NO_SUCH_ID, "x") == 0
    assert warpsocket.send([NO_SUCH_ID, "nobody-here"], "x") == 0
    assert warpsocket.has_subscriptions("nobody-here") is False
    assert a.received() == []


def test_str_and_bytes_channel_names_are_the_same(make_client):
    a = make_client()
    assert warpsocket.subscribe(a.sid, "same") == [a.sid]
    assert warpsocket.has_subscriptions(b"same") is True
    assert warpsocket.has_subscriptions(bytearray(b"same")) is True
    assert warpsocket.has_subscriptions(memoryview(b"__same")[2:]) is True
    assert warpsocket.send(b"same", "1") == 1
    assert warpsocket.send(bytearray(b"same"), "2") == 1
    assert warpsocket.send(memoryview(b"same"), "3") == 1
    # subscribing again through the bytes spelling only bumps the count
    assert warpsocket.subscribe(a.sid, b"same") == []
    assert warpsocket.send("same", "4") == 1
    assert warpsocket.unsubscribe(a.sid, b"same") == []
    assert warpsocket.unsubscribe(a.sid, bytearray(b"same")) == [a.sid]
    assert warpsocket.has_subscriptions("same") is False
    assert a.received() == ["1", "2", "3", "4"]


def test_non_ascii_channel_names_are_utf8(make_client):
    a = make_client()
    assert warpsocket.subscribe(a.sid, "kanal-ü-日本") == [a.sid]
    assert warpsocket.send("kanal-ü-日本".encode(), "hi") == 1
    assert warpsocket.has_subscriptions("kanal-ü-日本".encode()) is True
    assert a.received() == ["hi"]


def test_channel_send_keeps_text_and_binary(make_client):
    a, b = make_client(), make_client()
    warpsocket.subscribe([a.sid, b.sid], "types")
    assert warpsocket.send("types", "text") == 2
    assert warpsocket.send("types", b"\x00\xffbin") == 2
    assert warpsocket.send("types", bytearray(b"ba")) == 2
    assert warpsocket.send("types", "") == 2
    for client in (a, b):
        got = client.received()
        assert got == ["text", b"\x00\xffbin", b"ba", ""]
        assert [type(m) for m in got] == [str, bytes, bytes, str]


def test_send_mixed_list_returns_exact_total(make_client):
    a, b, c = make_client(), make_client(), make_client()
    warpsocket.subscribe([a.sid, b.sid], "mix")
    warpsocket.subscribe(c.sid, "mix2")
    n = warpsocket.send([a.sid, "mix", NO_SUCH_ID, "mix2", "empty-channel", c.sid], "m")
    assert n == 1 + 2 + 0 + 1 + 0 + 1
    assert a.received() == ["m", "m"]
    assert b.received() == ["m"]
    assert c.received() == ["m", "m"]


def test_send_list_repeats_count_twice(make_client):
    a, b = make_client(), make_client()
    warpsocket.subscribe([a.sid, b.sid], "rep")
    assert warpsocket.send([a.sid, a.sid], "x") == 2
    assert warpsocket.send(["rep", "rep"], "y") == 4
    assert warpsocket.send(["rep", b"rep", a.sid], "z") == 5
    assert warpsocket.send([], "nothing") == 0
    assert a.received() == ["x", "x", "y", "y", "z", "z", "z"]
    assert b.received() == ["y", "y", "z", "z"]


def test_channel_send_after_subscriber_leaves(make_client):
    a, b = make_client(), make_client()
    warpsocket.subscribe([a.sid, b.sid], "leave")
    assert warpsocket.send("leave", "1") == 2
    b.close()
    wait_for(lambda: warpsocket.send("leave", "probe") == 1, message="closed subscriber dropped")
    assert warpsocket.send("leave", "2") == 1
    got = a.received()
    assert got[0] == "1"
    assert got[-1] == "2"
    assert set(got[1:-1]) <= {"probe"}


# ---------------------------------------------------------------- reference counting


def test_subscribe_reference_counting(make_client):
    a = make_client()
    base = subs()
    assert warpsocket.subscribe(a.sid, "rc") == [a.sid]
    assert subs() == base + 1
    assert warpsocket.subscribe(a.sid, "rc") == []  # count 2: not newly subscribed
    assert subs() == base + 1  # still one socket/channel pair
    assert warpsocket.send("rc", "one copy") == 1  # one subscription entry, one copy
    assert warpsocket.unsubscribe(a.sid, "rc") == []  # count 1
    assert warpsocket.has_subscriptions("rc") is True
    assert warpsocket.send("rc", "still") == 1
    assert warpsocket.unsubscribe(a.sid, "rc") == [a.sid]  # count 0
    assert warpsocket.has_subscriptions("rc") is False
    assert subs() == base
    assert warpsocket.send("rc", "gone") == 0
    assert a.received() == ["one copy", "still"]


def test_subscribe_with_delta(make_client):
    a = make_client()
    assert warpsocket.subscribe(a.sid, "d", 2) == [a.sid]
    assert warpsocket.unsubscribe(a.sid, "d") == []
    assert warpsocket.has_subscriptions("d") is True
    assert warpsocket.send("d", "x") == 1
    assert warpsocket.unsubscribe(a.sid, "d") == [a.sid]
    assert warpsocket.has_subscriptions("d") is False
    # keyword delta, larger steps
    assert warpsocket.subscribe(a.sid, "d", delta=5) == [a.sid]
    assert warpsocket.unsubscribe(a.sid, "d", delta=4) == []
    assert warpsocket.unsubscribe(a.sid, "d", delta=1) == [a.sid]
    assert warpsocket.has_subscriptions("d") is False
    # delta 3 removed at once
    assert warpsocket.subscribe(a.sid, "d", 3) == [a.sid]
    assert warpsocket.unsubscribe(a.sid, "d", 3) == [a.sid]
    assert warpsocket.has_subscriptions("d") is False
    assert a.received() == ["x"]


def test_negative_delta_is_unsubscribe(make_client):
    a = make_client()
    assert warpsocket.subscribe(a.sid, "neg") == [a.sid]
    assert warpsocket.subscribe(a.sid, "neg", -1) == [a.sid]
    assert warpsocket.has_subscriptions("neg") is False
    # unsubscribe with a negative delta subscribes
    assert warpsocket.unsubscribe(a.sid, "neg", -2) == [a.sid]
    assert warpsocket.subscribe(a.sid, "neg", -1) == []
    assert warpsocket.has_subscriptions("neg") is True
    assert warpsocket.unsubscribe(a.sid, "neg", 1) == [a.sid]
    assert warpsocket.has_subscriptions("neg") is False


def test_delta_zero_is_a_noop(make_client):
    a = make_client()
    base = subs()
    assert warpsocket.subscribe(a.sid, "zero", 0) == []
    assert warpsocket.unsubscribe(a.sid, "zero", 0) == []
    assert warpsocket.has_subscriptions("zero") is False
    assert subs() == base
    warpsocket.subscribe(a.sid, "zero")
    assert warpsocket.subscribe(a.sid, "zero", 0) == []
    assert warpsocket.unsubscribe(a.sid, "zero", 0) == []
    assert warpsocket.subscribe("zero", "zero2", 0) == []
    assert warpsocket.has_subscriptions("zero2") is False
    assert warpsocket.has_subscriptions("zero") is True
    assert warpsocket.unsubscribe(a.sid, "zero") == [a.sid]  # count was exactly 1
    assert subs() == base


def test_count_never_goes_below_zero(make_client):
    a = make_client()
    base = subs()
    assert warpsocket.unsubscribe(a.sid, "floor") == []
    assert warpsocket.unsubscribe(a.sid, "floor", 5) == []
    assert warpsocket.has_subscriptions("floor") is False
    assert subs() == base
    # one subscribe is enough again: the count did not go negative
    assert warpsocket.subscribe(a.sid, "floor") == [a.sid]
    assert warpsocket.send("floor", "in") == 1
    # over-unsubscribing a subscribed socket reports it once and leaves it at 0
    assert warpsocket.unsubscribe(a.sid, "floor", 10) == [a.sid]
    assert warpsocket.has_subscriptions("floor") is False
    assert warpsocket.unsubscribe(a.sid, "floor") == []
    assert warpsocket.subscribe(a.sid, "floor") == [a.sid]
    assert warpsocket.unsubscribe(a.sid, "floor") == [a.sid]
    assert subs() == base
    assert a.received() == ["in"]


def test_subscribe_unknown_id_changes_nothing(make_client):
    a = make_client()
    before = warpsocket.stats()
    assert warpsocket.subscribe(NO_SUCH_ID, "ghost") == []
    assert warpsocket.has_subscriptions("ghost") is False
    assert warpsocket.unsubscribe(NO_SUCH_ID, "ghost") == []
    assert warpsocket.subscribe([NO_SUCH_ID, a.sid, NO_SUCH_ID + 1], "ghost") == [a.sid]
    after = warpsocket.stats()
    assert after["subscriptions"] == before["subscriptions"] + 1
    assert after["channels"] == before["channels"] + 1
    assert warpsocket.send("ghost", "boo") == 1
    assert warpsocket.unsubscribe([NO_SUCH_ID, a.sid], "ghost") == [a.sid]
    assert warpsocket.stats()["subscriptions"] == before["subscriptions"]
    assert a.received() == ["boo"]


def test_subscribe_closed_socket_changes_nothing(make_client):
    a, b = make_client(), make_client()
    gone = b.sid
    b.close()
    wait_for(lambda: warpsocket.send(gone, "probe") == 0, message="socket closed")
    base = subs()
    assert warpsocket.subscribe(gone, "closed-chan") == []
    assert warpsocket.has_subscriptions("closed-chan") is False
    assert subs() == base
    assert warpsocket.subscribe([gone, a.sid], "closed-chan") == [a.sid]
    assert warpsocket.send("closed-chan", "m") == 1
    assert a.received() == ["m"]


def test_list_targets(make_client):
    a, b, c = make_client(), make_client(), make_client()
    base = subs()
    assert sorted(warpsocket.subscribe([a.sid, b.sid], "lst")) == sorted([a.sid, b.sid])
    assert sorted(warpsocket.subscribe([a.sid, b.sid, c.sid], "lst")) == [c.sid]
    assert subs() == base + 3
    assert warpsocket.send("lst", "all") == 3
    assert warpsocket.subscribe([], "lst") == []
    # a and b have count 2, c has count 1
    assert warpsocket.unsubscribe([a.sid, b.sid, c.sid], "lst") == [c.sid]
    assert sorted(warpsocket.unsubscribe([a.sid, b.sid], "lst")) == sorted([a.sid, b.sid])
    assert warpsocket.has_subscriptions("lst") is False
    assert subs() == base
    for client in (a, b, c):
        assert client.received() == ["all"]


def test_list_target_repeats_are_counted(make_client):
    a = make_client()
    # lists are not de-duplicated: the count goes up by 2, the id is new once
    assert warpsocket.subscribe([a.sid, a.sid], "twice") == [a.sid]
    assert warpsocket.send("twice", "1") == 1
    assert warpsocket.unsubscribe(a.sid, "twice") == []
    assert warpsocket.has_subscriptions("twice") is True
    assert warpsocket.unsubscribe(a.sid, "twice") == [a.sid]
    assert warpsocket.has_subscriptions("twice") is False
    assert warpsocket.subscribe(a.sid, "twice", 1) == [a.sid]
    assert warpsocket.unsubscribe([a.sid, a.sid], "twice") == [a.sid]
    assert warpsocket.has_subscriptions("twice") is False
    assert a.received() == ["1"]


def test_channel_to_channel_subscribe(make_client):
    x, y, z, w = make_client(), make_client(), make_client(), make_client()
    warpsocket.subscribe([x.sid, y.sid], "src")
    warpsocket.subscribe([y.sid, z.sid], "dst")
    base = subs()
    # every current subscriber of "src" gets +1 on "dst"; only x is new there
    assert warpsocket.subscribe("src", "dst") == [x.sid]
    assert subs() == base + 1
    assert warpsocket.send("dst", "d1") == 3
    # the subscription is per socket, not a live link: later subscribers of src are not added
    warpsocket.subscribe(w.sid, "src")
    assert warpsocket.send("dst", "d2") == 3
    # y has count 2 on dst, x count 1: a negative delta only drops x
    assert warpsocket.unsubscribe("src", "dst") == [x.sid]
    assert warpsocket.send("dst", "d3") == 2  # y and z
    assert warpsocket.unsubscribe(y.sid, "dst") == [y.sid]
    assert warpsocket.send("dst", "d4") == 1  # z
    # a channel nobody subscribes to adds nobody
    assert warpsocket.subscribe("empty-src", "dst") == []
    assert warpsocket.unsubscribe("empty-src", "dst") == []
    # negative delta through subscribe(): x, y, w are in src; only those subscribed lose it
    warpsocket.subscribe(x.sid, "dst")
    assert warpsocket.subscribe("src", "dst", -1) == [x.sid]
    # src itself is untouched
    assert warpsocket.send("src", "s") == 3
    assert x.received() == ["d1", "d2", "s"]
    assert y.received() == ["d1", "d2", "d3", "s"]
    assert z.received() == ["d1", "d2", "d3", "d4"]
    assert w.received() == ["s"]


def test_channel_to_channel_with_delta_two(make_client):
    a, b = make_client(), make_client()
    warpsocket.subscribe([a.sid, b.sid], "cs")
    assert sorted(warpsocket.subscribe("cs", "cd", 2)) == sorted([a.sid, b.sid])
    assert warpsocket.unsubscribe("cs", "cd") == []
    assert warpsocket.send("cd", "m") == 2
    assert sorted(warpsocket.unsubscribe("cs", "cd")) == sorted([a.sid, b.sid])
    assert warpsocket.has_subscriptions("cd") is False
    assert a.received() == ["m"]
    assert b.received() == ["m"]


def test_channel_to_itself(make_client):
    a = make_client()
    warpsocket.subscribe(a.sid, "self")
    assert warpsocket.subscribe("self", "self") == []  # count 2 now
    assert warpsocket.unsubscribe(a.sid, "self") == []
    assert warpsocket.unsubscribe("self", "self") == [a.sid]
    assert warpsocket.has_subscriptions("self") is False


def test_mixed_list_target(make_client):
    a, b, c = make_client(), make_client(), make_client()
    warpsocket.subscribe([a.sid, b.sid], "group")
    base = subs()
    got = warpsocket.subscribe([c.sid, "group", NO_SUCH_ID], "mixed")
    assert sorted(got) == sorted([a.sid, b.sid, c.sid])
    assert subs() == base + 3
    assert warpsocket.send("mixed", "hi") == 3
    # a is in "group" and listed explicitly: its count goes to 2... then back to 0
    assert warpsocket.subscribe([a.sid, "empty-group"], "mixed") == []
    assert sorted(warpsocket.unsubscribe([c.sid, "group"], "mixed")) == sorted([b.sid, c.sid])
    assert warpsocket.send("mixed", "a only") == 1
    assert warpsocket.unsubscribe([a.sid], "mixed") == [a.sid]
    assert warpsocket.has_subscriptions("mixed") is False
    assert subs() == base
    assert a.received() == ["hi", "a only"]
    assert b.received() == ["hi"]
    assert c.received() == ["hi"]


# ---------------------------------------------------------------- argument checking


@pytest.mark.parametrize(
    ("call", "exc", "argname"),
    [
        (lambda: warpsocket.subscribe(1, "c", True), TypeError, "delta"),
        (lambda: warpsocket.subscribe(1, "c", False), TypeError, "delta"),
        (lambda: warpsocket.subscribe(1, "c", 1.0), TypeError, "delta"),
        (lambda: warpsocket.subscribe(1, "c", "1"), TypeError, "delta"),
        (lambda: warpsocket.unsubscribe(1, "c", True), TypeError, "delta"),
        (lambda: warpsocket.unsubscribe(1, "c", 2.5), TypeError, "delta"),
        (lambda: warpsocket.subscribe(1, 5), TypeError, "channel"),
        (lambda: warpsocket.subscribe(1, None), TypeError, "channel"),
        (lambda: warpsocket.unsubscribe(1, 5), TypeError, "channel"),
        (lambda: warpsocket.subscribe(True, "c"), TypeError, "target"),
        (lambda: warpsocket.subscribe(None, "c"), TypeError, "target"),
        (lambda: warpsocket.subscribe(1.0, "c"), TypeError, "target"),
        (lambda: warpsocket.subscribe([1, True], "c"), TypeError, "target"),
        (lambda: warpsocket.subscribe(0, "c"), ValueError, "target"),
        (lambda: warpsocket.subscribe(-3, "c"), ValueError, "target"),
        (lambda: warpsocket.subscribe([5, -1], "c"), ValueError, "target"),
        (lambda: warpsocket.unsubscribe(0, "c"), ValueError, "target"),
        (lambda: warpsocket.unsubscribe(False, "c"), TypeError, "target"),
        (lambda: warpsocket.has_subscriptions(5), TypeError, "channel"),
        (lambda: warpsocket.has_subscriptions(None), TypeError, "channel"),
        (lambda: warpsocket.send("c", 5), TypeError, "data"),
        (lambda: warpsocket.send(["c", 1.5], "x"), TypeError, "target"),
    ],
    ids=[
        "sub-delta-true",
        "sub-delta-false",
        "sub-delta-float",
        "sub-delta-str",
        "unsub-delta-true",
        "unsub-delta-float",
        "sub-channel-int",
        "sub-channel-none",
        "unsub-channel-int",
        "sub-target-bool",
        "sub-target-none",
        "sub-target-float",
        "sub-target-list-bool",
        "sub-target-zero",
        "sub-target-negative",
        "sub-target-list-negative",
        "unsub-target-zero",
        "unsub-target-bool",
        "has-int",
        "has-none",
        "send-data-int",
        "send-list-float",
    ],
)
def test_bad_arguments(server, call, exc, argname):
    before = warpsocket.stats()["subscriptions"]
    with pytest.raises(exc) as info:
        call()
    assert argname in str(info.value), f"message should name {argname!r}: {info.value}"
    assert warpsocket.stats()["subscriptions"] == before


# ---------------------------------------------------------------- calls from handlers


def test_subscribe_in_handle_open_and_broadcast_from_handler(server, make_client):
    a = make_client("/join/lobby,own")
    b = make_client("/join/lobby")
    c = make_client("/")
    assert warpsocket.has_subscriptions("lobby") is True
    assert warpsocket.send("lobby", "from main") == 2
    # a handler broadcasts to the lobby: both members get it, the sender also gets the count
    c.ws.send("bcast lobby from c")
    assert c.recv() == "sent 2"
    a.ws.send("bcast lobby from a")
    assert a.recv() == "from main"
    assert a.recv() == "from c"
    assert a.recv() == "from a"
    assert a.recv() == "sent 2"
    assert a.received() == []
    assert b.received() == ["from main", "from c", "from a"]
    assert c.received() == []
    # binary broadcast from a handler
    c.ws.send("bcastbin lobby raw")
    assert c.recv() == "sent 2"
    assert a.recv() == b"raw"
    assert b.recv() == b"raw"


def test_subscribe_and_unsubscribe_from_handler(make_client):
    a, b = make_client(), make_client()
    assert ask(a.ws, "sub hchan") == f"sub {a.sid}"
    assert ask(a.ws, "sub hchan") == "sub "
    assert ask(b.ws, "sub hchan") == f"sub {b.sid}"
    assert ask(b.ws, "has hchan") == "has True"
    assert warpsocket.send("hchan", "x") == 2
    assert a.recv() == "x"
    assert b.recv() == "x"
    assert ask(a.ws, "unsub hchan") == "unsub "
    assert ask(a.ws, "unsub hchan") == f"unsub {a.sid}"
    assert ask(a.ws, "unsub hchan") == "unsub "
    assert ask(b.ws, "unsub hchan") == f"unsub {b.sid}"
    assert ask(a.ws, "has hchan") == "has False"
    assert warpsocket.has_subscriptions("hchan") is False


def test_handle_open_subscriptions_are_undone_when_refused(server, make_client):
    a = make_client("/join/keep")
    wait_for(lambda: warpsocket.stats()["connections"] == 1, message="one connection")
    before = warpsocket.stats()
    with pytest.raises(InvalidStatus) as info:
        connect(server, "/refuse/undo-a,undo-b,keep")
    assert info.value.response.status_code == 403
    # the refused socket's subscriptions are gone
    wait_for(lambda: subs() == before["subscriptions"], message="subscriptions undone")
    assert warpsocket.has_subscriptions("undo-a") is False
    assert warpsocket.has_subscriptions("undo-b") is False
    assert warpsocket.send("undo-a", "x") == 0
    assert warpsocket.send("keep", "k") == 1  # only the accepted client
    stats = warpsocket.stats()
    assert stats["channels"] == before["channels"]
    assert stats["connections"] == before["connections"]
    # the kv write made in handle_open stays; the refused id is not a live socket
    refused_sid = int(warpsocket.get_key("refused-sid:/refuse/undo-a,undo-b,keep"))
    assert refused_sid > 0
    assert warpsocket.send(refused_sid, "x") == 0
    assert warpsocket.subscribe(refused_sid, "undo-a") == []
    assert warpsocket.has_subscriptions("undo-a") is False
    assert a.received() == ["k"]


# ---------------------------------------------------------------- disconnects


def test_has_subscriptions_false_after_last_subscriber_disconnects(server, make_client):
    a, b = make_client(), make_client()
    warpsocket.subscribe([a.sid, b.sid], "last")
    warpsocket.subscribe(a.sid, "only-a", 3)  # a count > 1 does not keep it alive either
    base = warpsocket.stats()
    a.close()
    wait_for(lambda: not warpsocket.has_subscriptions("only-a"), message="only-a empty")
    assert warpsocket.has_subscriptions("last") is True
    wait_for(lambda: warpsocket.send("last", "probe") == 1, message="a gone from 'last'")
    b.close()
    wait_for(lambda: not warpsocket.has_subscriptions("last"), message="last empty")
    assert warpsocket.send("last", "x") == 0
    wait_for(
        lambda: warpsocket.stats()["subscriptions"] == base["subscriptions"] - 3,
        message="subscriptions cleaned up",
    )
    stats = warpsocket.stats()
    assert stats["channels"] == base["channels"] - 2
    assert stats["connections"] == base["connections"] - 2


def test_one_two_and_back_to_one_channel_all_cleaned_up_on_disconnect(server, make_client):
    # a socket's first channel is kept without an allocation, a second one or a virtual
    # socket moves them into sets, and leaving a channel drops it from whichever is used
    a, b = make_client(), make_client()
    base = warpsocket.stats()
    assert warpsocket.subscribe(a.sid, "first") == [a.sid]
    assert warpsocket.unsubscribe(a.sid, "first") == [a.sid]
    assert warpsocket.has_subscriptions("first") is False
    assert warpsocket.subscribe(a.sid, "first") == [a.sid]
    assert warpsocket.subscribe(a.sid, "second") == [a.sid]
    assert warpsocket.unsubscribe(a.sid, "first") == [a.sid]
    assert warpsocket.has_subscriptions("first") is False
    vid = warpsocket.create_virtual_socket(a.sid)
    assert warpsocket.subscribe([a.sid, vid, b.sid], "third") == [a.sid, vid, b.sid]
    assert warpsocket.unsubscribe(a.sid, "second") == [a.sid]
    assert warpsocket.send("third", "t") == 3
    assert warpsocket.send("second", "s") == 0
    assert warpsocket.stats()["subscriptions"] == base["subscriptions"] + 3
    a.close()
    wait_for(lambda: warpsocket.send("third", "probe") == 1, message="a and its virtual socket gone")
    wait_for(
        lambda: warpsocket.stats()["subscriptions"] == base["subscriptions"] + 1,
        message="a's subscriptions removed",
    )
    assert warpsocket.subscribe(vid, "fourth") == []
    assert [m for m in b.received() if m != "probe"] == ["t"]
    b.close()
    wait_for(lambda: not warpsocket.has_subscriptions("third"), message="third empty")
    wait_for(lambda: warpsocket.stats()["channels"] == base["channels"], message="no channels left")


def test_socket_is_in_no_channel_when_handle_close_runs(server, make_client):
    a = make_client("/join/lobby2")
    b = make_client("/join/lobby2")
    own = f"own:{a.sid}"
    assert warpsocket.subscribe(a.sid, own, 2) == [a.sid]
    assert warpsocket.has_subscriptions(own) is True
    a.close()
    sent = wait_for(lambda: warpsocket.get_key(f"closed-send:{a.sid}"), message="handle_close ran")
    value = warpsocket.get_key(f"closed:{a.sid}")
    assert value == b"0", "has_subscriptions(own channel) was True inside handle_close"
    assert sent == b"0", "sends to the closed socket / its channel counted recipients"
    assert warpsocket.has_subscriptions(own) is False
    assert warpsocket.send("lobby2", "x") == 1
    assert b.received() == ["x"]


def test_server_close_removes_subscriptions(server, make_client):
    a, b = make_client(), make_client()
    warpsocket.subscribe([a.sid, b.sid], "kicked")
    base = subs()
    assert warpsocket.close(a.sid) is True
    # from the moment a connection is closing, sends to it count 0
    assert warpsocket.send(a.sid, "x") == 0
    wait_for(lambda: warpsocket.send("kicked", "probe") == 1, message="a out of the channel")
    wait_for(lambda: subs() == base - 1, message="subscription of a removed")
    b.close()
    wait_for(lambda: not warpsocket.has_subscriptions("kicked"), message="channel empty")


# ---------------------------------------------------------------- stats


def test_stats_counts_for_a_known_setup(start_server):
    server = start_server(CHANNEL_WORKER, threads=2, ping_interval=600.0)
    stats = warpsocket.stats()
    assert stats["connections"] == 0
    assert stats["channels"] == 0
    assert stats["subscriptions"] == 0
    assert stats["virtual_sockets"] == 0
    clients = [IdClient(server) for _ in range(3)]
    try:
        a, b, c = clients
        wait_for(lambda: warpsocket.stats()["connections"] == 3, message="3 connections")
        warpsocket.subscribe([a.sid, b.sid, c.sid], "s1")
        warpsocket.subscribe([a.sid, b.sid], "s2", 2)
        warpsocket.subscribe(a.sid, "s3")
        v1 = warpsocket.create_virtual_socket(a.sid)
        v2 = warpsocket.create_virtual_socket(b.sid, "p:")
        warpsocket.subscribe([v1, v2], "s3")
        warpsocket.subscribe(v2, "s4")
        stats = warpsocket.stats()
        assert stats["connections"] == 3
        assert stats["virtual_sockets"] == 2
        assert stats["channels"] == 4
        assert stats["subscriptions"] == 3 + 2 + 1 + 2 + 1
        assert sum(w["connections"] for w in stats["workers"]) == 3

        warpsocket.unsubscribe(v2, "s4")
        warpsocket.unsubscribe([a.sid, b.sid], "s2")  # count 2 -> 1: pairs stay
        stats = warpsocket.stats()
        assert stats["channels"] == 3
        assert stats["subscriptions"] == 3 + 2 + 1 + 2
        assert warpsocket.delete_virtual_socket(v1) is True
        stats = warpsocket.stats()
        assert stats["virtual_sockets"] == 1
        assert stats["subscriptions"] == 3 + 2 + 1 + 1

        # messages_out / bytes_out count queued frames and their payload bytes
        before = warpsocket.stats()
        assert warpsocket.send("s1", "hello") == 3
        assert warpsocket.send([a.sid, b.sid], b"\x00" * 10) == 2
        assert warpsocket.send("s2", "") == 2

        def counted():
            now = warpsocket.stats()
            return (now["messages_out"] - before["messages_out"], now["bytes_out"] - before["bytes_out"])

        wait_for(lambda: counted() == (7, 35), timeout=20, message=f"counters (now {counted()})")
        assert a.received() == ["hello", b"\x00" * 10, ""]
        assert b.received() == ["hello", b"\x00" * 10, ""]
        assert c.received() == ["hello"]
    finally:
        for client in clients:
            client.close()
    wait_for(lambda: warpsocket.stats()["connections"] == 0, message="all closed")
    wait_for(
        lambda: warpsocket.stats()["subscriptions"] == 0 and warpsocket.stats()["channels"] == 0,
        message="no subscriptions left",
    )
    wait_for(lambda: warpsocket.stats()["virtual_sockets"] == 0, message="no virtual sockets left")


def test_stats_messages_out_not_counted_for_unknown_targets(start_server):
    start_server(CHANNEL_WORKER, threads=2, ping_interval=600.0)
    before = warpsocket.stats()
    assert warpsocket.send([NO_SUCH_ID, "no-channel"], "x" * 100) == 0
    after = warpsocket.stats()
    assert after["messages_out"] == before["messages_out"]
    assert after["bytes_out"] == before["bytes_out"]


def test_refused_upgrade_via_raised_handle_open_undoes_subscriptions(start_server):
    source = """
    import warpsocket

    def handle_open(socket_id, ip, headers):
        warpsocket.subscribe(socket_id, "raise-chan")
        warpsocket.create_virtual_socket(socket_id, "v")
        raise RuntimeError("refuse with 500")
    """
    server = start_server(source, threads=2)
    with pytest.raises(InvalidStatus) as info:
        connect(server)
    assert info.value.response.status_code == 500
    wait_for(lambda: warpsocket.stats()["subscriptions"] == 0, message="subscription undone")
    wait_for(lambda: warpsocket.stats()["virtual_sockets"] == 0, message="virtual socket undone")
    assert warpsocket.has_subscriptions("raise-chan") is False
    assert warpsocket.stats()["channels"] == 0


def test_channel_functions_without_a_running_server():
    stats = warpsocket.stats()
    assert stats["connections"] == 0
    assert stats["channels"] == 0
    assert stats["subscriptions"] == 0
    assert stats["virtual_sockets"] == 0
    assert warpsocket.subscribe(NO_SUCH_ID, "offline") == []
    assert warpsocket.subscribe([NO_SUCH_ID, "offline"], "offline2", 3) == []
    assert warpsocket.unsubscribe(NO_SUCH_ID, "offline") == []
    assert warpsocket.has_subscriptions("offline") is False
    assert warpsocket.send(["offline", NO_SUCH_ID], "m") == 0
    with pytest.raises(ValueError, match="socket_id"):
        warpsocket.create_virtual_socket(NO_SUCH_ID)
    assert warpsocket.delete_virtual_socket(NO_SUCH_ID) is False
    with pytest.raises(TypeError, match="delta"):
        warpsocket.subscribe(NO_SUCH_ID, "offline", True)
    assert warpsocket.stats()["subscriptions"] == 0
