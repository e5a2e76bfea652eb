"""Virtual sockets: create_virtual_socket / delete_virtual_socket, prefixes, chains, close.

Clients learn their socket id by sending "id".  "Nothing else arrived" is checked with a
sentinel sent straight to the actual socket after the messages under test.
"""

from __future__ import annotations

import pytest
import warpsocket
from helpers import ask, connect, expect_close, wait_for
from websockets.exceptions import InvalidStatus

VS_WORKER = """
import warpsocket

def handle_open(socket_id, ip, headers):
    path = headers.get(":path", "/")
    if path.startswith("/vjoin/"):
        # a virtual socket with a prefix, subscribed to the channel named in the path
        ch = path[len("/vjoin/"):]
        vid = warpsocket.create_virtual_socket(socket_id, ch + ">")
        warpsocket.subscribe(vid, ch)
        warpsocket.set_key(f"vid-of:{socket_id}", str(vid))
    elif path.startswith("/vrefuse/"):
        tag = path[len("/vrefuse/"):]
        warpsocket.subscribe(socket_id, tag + "-direct")
        vid = warpsocket.create_virtual_socket(socket_id, "r:")
        vid2 = warpsocket.create_virtual_socket(vid, "r2:")
        warpsocket.subscribe([vid, vid2], tag + "-virtual")
        warpsocket.set_key(f"refused:{tag}", f"{socket_id} {vid} {vid2}")
        return False
    return True

def handle_text_message(text, socket_id):
    cmd, _, rest = text.partition(" ")
    if cmd == "id":
        warpsocket.send(socket_id, str(socket_id))
    elif cmd == "mkv":
        vid = warpsocket.create_virtual_socket(socket_id, rest or None)
        warpsocket.send(socket_id, str(vid))
    elif cmd == "sendto":
        target, _, msg = rest.partition(" ")
        warpsocket.send(socket_id, f"sent {warpsocket.send(int(target), msg)}")
    else:
        warpsocket.send(socket_id, text)

def handle_close(socket_id):
    vid = warpsocket.get_key(f"vid-of:{socket_id}")
    if vid is not None:
        warpsocket.set_key(f"vid-close-send:{socket_id}", str(warpsocket.send(int(vid), "x")))
"""

NO_SUCH_ID = 10**15 + 54321


@pytest.fixture
def server(start_server):
    return start_server(VS_WORKER, threads=2)


def vcount():
    return warpsocket.stats()["virtual_sockets"]


# ---------------------------------------------------------------- create / send


def test_create_returns_new_ids_and_prefix_is_prepended(make_client):
    a = make_client()
    base = vcount()
    v1 = warpsocket.create_virtual_socket(a.sid, "pre:")
    v2 = warpsocket.create_virtual_socket(a.sid)
    v3 = warpsocket.create_virtual_socket(a.sid, user_prefix=b"bin:")
    ids = [a.sid, v1, v2, v3]
    assert all(type(i) is int and i > 0 for i in ids)
    assert len(set(ids)) == 4
    assert vcount() == base + 3
    assert warpsocket.send(v1, "hello") == 1
    assert warpsocket.send(v2, "plain") == 1
    assert warpsocket.send(v3, "text") == 1
    assert warpsocket.send(v1, b"\x00\x01") == 1
    assert warpsocket.send(v3, b"\x02") == 1
    got = a.received()
    assert got == ["pre:hello", "plain", "bin:text", b"pre:\x00\x01", b"bin:\x02"]
    assert [type(m) for m in got] == [str, str, str, bytes, bytes]


def test_ids_are_never_reused(make_client):
    a = make_client()
    seen = {a.sid}
    for _ in range(20):
        vid = warpsocket.create_virtual_socket(a.sid)
        assert vid not in seen
        seen.add(vid)
        assert warpsocket.delete_virtual_socket(vid) is True
    b = make_client()
    assert b.sid not in seen


def test_empty_prefix_is_no_prefix(make_client):
    a = make_client()
    v1 = warpsocket.create_virtual_socket(a.sid, "")
    v2 = warpsocket.create_virtual_socket(a.sid, b"")
    assert warpsocket.send([v1, v2], "m") == 2
    assert a.received() == ["m", "m"]


def test_prefix_length_limit(make_client):
    a = make_client()
    base = vcount()
    v15 = warpsocket.create_virtual_socket(a.sid, "x" * 15)
    v15u = warpsocket.create_virtual_socket(a.sid, "é" * 7 + "z")  # 15 bytes
    with pytest.raises(ValueError, match="prefix"):
        warpsocket.create_virtual_socket(a.sid, "x" * 16)
    with pytest.raises(ValueError, match="prefix"):
        warpsocket.create_virtual_socket(a.sid, b"\x00" * 16)
    with pytest.raises(ValueError, match="prefix"):
        warpsocket.create_virtual_socket(a.sid, "é" * 8)  # 8 characters, 16 bytes
    assert vcount() == base + 2
    assert warpsocket.send([v15, v15u], "!") == 2
    assert a.received() == ["x" * 15 + "!", "é" * 7 + "z!"]


def test_non_utf8_prefix_turns_text_into_binary(make_client):
    a = make_client()
    bad = warpsocket.create_virtual_socket(a.sid, b"\xff")
    half = warpsocket.create_virtual_socket(a.sid, b"\xc3")  # truncated sequence
    good = warpsocket.create_virtual_socket(a.sid, "é".encode())  # valid UTF-8 as bytes
    good_ba = warpsocket.create_virtual_socket(a.sid, bytearray(b"ok "))
    assert warpsocket.send(bad, "hi") == 1
    assert warpsocket.send(half, "é") == 1
    assert warpsocket.send(good, "hi") == 1
    assert warpsocket.send(good_ba, "hi") == 1
    assert warpsocket.send(bad, b"bin") == 1
    got = a.received()
    assert got == [b"\xffhi", b"\xc3\xc3\xa9", "éhi", "ok hi", b"\xffbin"]
    assert [type(m) for m in got] == [bytes, bytes, str, str, bytes]


def test_chain_uses_nearest_non_empty_prefix(make_client):
    a = make_client()
    v1 = warpsocket.create_virtual_socket(a.sid, "p1:")
    v2 = warpsocket.create_virtual_socket(v1, "p2:")
    v3 = warpsocket.create_virtual_socket(v2)  # no prefix: p2 is the nearest
    v4 = warpsocket.create_virtual_socket(v1, "")  # empty prefix: p1 is the nearest
    n1 = warpsocket.create_virtual_socket(a.sid)
    n2 = warpsocket.create_virtual_socket(n1)  # no prefix anywhere
    n3 = warpsocket.create_virtual_socket(n2, "p3:")
    assert warpsocket.send(v1, "m") == 1
    assert warpsocket.send(v2, "m") == 1
    assert warpsocket.send(v3, "m") == 1
    assert warpsocket.send(v4, "m") == 1
    assert warpsocket.send(n2, "m") == 1
    assert warpsocket.send(n3, "m") == 1
    assert a.received() == ["p1:m", "p2:m", "p2:m", "p1:m", "m", "p3:m"]


def test_chain_non_utf8_prefix_only_when_nearest(make_client):
    a = make_client()
    bad = warpsocket.create_virtual_socket(a.sid, b"\xfe")
    good = warpsocket.create_virtual_socket(bad, "g:")  # nearest is valid: stays text
    via = warpsocket.create_virtual_socket(bad)  # nearest non-empty is \xfe: binary
    assert warpsocket.send([good, via], "t") == 2
    got = a.received()
    assert got == ["g:t", b"\xfet"]


def test_virtual_socket_in_channel(make_client):
    a, b = make_client(), make_client()
    v = warpsocket.create_virtual_socket(a.sid, "[room] ")
    base = warpsocket.stats()["subscriptions"]
    assert warpsocket.subscribe(v, "vroom") == [v]
    assert warpsocket.subscribe(b.sid, "vroom") == [b.sid]
    assert warpsocket.stats()["subscriptions"] == base + 2
    assert warpsocket.has_subscriptions("vroom") is True
    assert warpsocket.send("vroom", "hi") == 2
    assert a.received() == ["[room] hi"]
    assert b.received() == ["hi"]
    assert warpsocket.unsubscribe(v, "vroom") == [v]
    assert warpsocket.send("vroom", "again") == 1
    assert a.received() == []


def test_direct_and_virtual_subscription_give_two_copies(make_client):
    a = make_client()
    v = warpsocket.create_virtual_socket(a.sid, "v:")
    w = warpsocket.create_virtual_socket(v)  # chain, inherits "v:"
    warpsocket.subscribe([a.sid, v, w], "copies")
    assert warpsocket.send("copies", "m") == 3
    got = a.received()
    assert sorted(got) == sorted(["m", "v:m", "v:m"])
    # a mixed list counts the channel entries plus the ids
    assert warpsocket.send(["copies", v, a.sid], "n") == 5
    got = a.received()
    assert sorted(got) == sorted(["n", "v:n", "v:n", "v:n", "n"])


def test_virtual_socket_of_a_channel_member_in_channel_to_channel_subscribe(make_client):
    a = make_client()
    v = warpsocket.create_virtual_socket(a.sid, "v:")
    warpsocket.subscribe([a.sid, v], "ccsrc")
    assert sorted(warpsocket.subscribe("ccsrc", "ccdst")) == sorted([a.sid, v])
    assert warpsocket.send("ccdst", "x") == 2
    assert sorted(a.received()) == ["v:x", "x"]


# ---------------------------------------------------------------- delete


def test_delete_removes_from_every_channel(make_client):
    a = make_client()
    v = warpsocket.create_virtual_socket(a.sid, "v:")
    warpsocket.subscribe(v, "d1")
    warpsocket.subscribe(v, "d2", 3)
    warpsocket.subscribe([v, a.sid], "d3")
    before = warpsocket.stats()
    assert warpsocket.delete_virtual_socket(v) is True
    after = warpsocket.stats()
    assert after["virtual_sockets"] == before["virtual_sockets"] - 1
    assert after["subscriptions"] == before["subscriptions"] - 3
    assert after["channels"] == before["channels"] - 2
    assert warpsocket.has_subscriptions("d1") is False
    assert warpsocket.has_subscriptions("d2") is False
    assert warpsocket.has_subscriptions("d3") is True
    assert warpsocket.send(["d1", "d2", "d3"], "m") == 1
    assert warpsocket.send(v, "m") == 0
    assert warpsocket.delete_virtual_socket(v) is False
    assert warpsocket.subscribe(v, "d1") == []  # deleted ids change nothing
    assert warpsocket.has_subscriptions("d1") is False
    assert a.received() == ["m"]


def test_delete_unknown_and_actual_ids(make_client):
    a = make_client()
    assert warpsocket.delete_virtual_socket(NO_SUCH_ID) is False
    # an actual socket is not a virtual socket: nothing is deleted
    assert warpsocket.delete_virtual_socket(a.sid) is False
    assert warpsocket.send(a.sid, "alive") == 1
    assert a.received() == ["alive"]


def test_delete_with_expected_target(make_client):
    a, b = make_client(), make_client()
    v = warpsocket.create_virtual_socket(a.sid, "v:")
    w = warpsocket.create_virtual_socket(v, "w:")
    warpsocket.subscribe([v, w], "exp")
    before = warpsocket.stats()
    assert warpsocket.delete_virtual_socket(v, expected_target=b.sid) is False
    assert warpsocket.delete_virtual_socket(v, NO_SUCH_ID) is False
    assert warpsocket.delete_virtual_socket(w, a.sid) is False  # w points at v, not at a
    assert warpsocket.stats()["virtual_sockets"] == before["virtual_sockets"]
    assert warpsocket.stats()["subscriptions"] == before["subscriptions"]
    assert warpsocket.send("exp", "still") == 2
    assert warpsocket.delete_virtual_socket(w, expected_target=v) is True
    assert warpsocket.delete_virtual_socket(v, expected_target=a.sid) is True
    assert warpsocket.delete_virtual_socket(v, expected_target=a.sid) is False
    assert warpsocket.has_subscriptions("exp") is False
    assert sorted(a.received()) == ["v:still", "w:still"]
    assert b.received() == []


def test_deleting_a_link_kills_the_chain(make_client):
    a = make_client()
    v1 = warpsocket.create_virtual_socket(a.sid, "1:")
    v2 = warpsocket.create_virtual_socket(v1, "2:")
    v3 = warpsocket.create_virtual_socket(v2)
    warpsocket.subscribe(v3, "chain-only")
    assert warpsocket.has_subscriptions("chain-only") is True
    assert warpsocket.delete_virtual_socket(v2) is True
    assert warpsocket.send(v3, "x") == 0
    assert warpsocket.send("chain-only", "x") == 0
    assert warpsocket.has_subscriptions("chain-only") is False
    assert warpsocket.send(v1, "y") == 1
    assert a.received() == ["1:y"]


# ---------------------------------------------------------------- close / lifetime


def test_close_on_virtual_socket_closes_the_connection(server, make_client):
    a, b = make_client(), make_client()
    v = warpsocket.create_virtual_socket(a.sid, "v:")
    w = warpsocket.create_virtual_socket(v)
    assert warpsocket.close(w, 4001, "via virtual") is True
    assert expect_close(a.ws) == (4001, "via virtual")
    assert warpsocket.close(v) is False  # already closing
    assert warpsocket.send(v, "x") == 0
    vb = warpsocket.create_virtual_socket(b.sid)
    assert warpsocket.close(vb) is True
    assert expect_close(b.ws) == (1000, "")


def test_virtual_sockets_die_with_their_connection(server, make_client):
    a, b = make_client(), make_client()
    base = vcount()
    v1 = warpsocket.create_virtual_socket(a.sid, "1:")
    v2 = warpsocket.create_virtual_socket(v1, "2:")
    v3 = warpsocket.create_virtual_socket(a.sid)
    vb = warpsocket.create_virtual_socket(b.sid, "b:")
    warpsocket.subscribe([v1, v2, v3, vb], "mortal")
    warpsocket.subscribe(v2, "only-a-virtual")
    assert vcount() == base + 4
    assert warpsocket.send("mortal", "m") == 4
    a.close()
    wait_for(lambda: warpsocket.send(v1, "probe") == 0, message="v1 stops receiving")
    assert warpsocket.send([v1, v2, v3], "x") == 0
    wait_for(lambda: warpsocket.send("mortal", "probe") == 1, message="channel down to vb")
    wait_for(lambda: not warpsocket.has_subscriptions("only-a-virtual"), message="no live subscriber")
    wait_for(lambda: vcount() == base + 1, message="a's virtual sockets cleaned up")
    wait_for(lambda: warpsocket.stats()["subscriptions"] == 1, message="subscriptions cleaned up")
    for vid in (a.sid, v1, v2, v3):
        with pytest.raises(ValueError):
            warpsocket.create_virtual_socket(vid)
    assert warpsocket.delete_virtual_socket(vb) is True
    assert vcount() == base


def test_virtual_socket_is_dead_inside_handle_close(server, make_client):
    a = make_client("/vjoin/hc")
    vid = int(warpsocket.get_key(f"vid-of:{a.sid}"))
    assert warpsocket.send("hc", "m") == 1
    assert a.recv() == "hc>m"
    a.close()
    value = wait_for(lambda: warpsocket.get_key(f"vid-close-send:{a.sid}"), message="handle_close ran")
    assert value == b"0"
    assert warpsocket.send(vid, "x") == 0


def test_create_virtual_socket_bad_targets(server, make_client):
    a = make_client()
    with pytest.raises(ValueError, match="socket_id"):
        warpsocket.create_virtual_socket(NO_SUCH_ID)
    with pytest.raises(ValueError, match="socket_id"):
        warpsocket.create_virtual_socket(0)
    with pytest.raises(ValueError, match="socket_id"):
        warpsocket.create_virtual_socket(-5)
    v = warpsocket.create_virtual_socket(a.sid)
    assert warpsocket.delete_virtual_socket(v) is True
    with pytest.raises(ValueError, match="socket_id"):
        warpsocket.create_virtual_socket(v)  # deleted virtual socket


def test_create_virtual_socket_on_closed_connection(server, make_client):
    a = make_client()
    gone = a.sid
    warpsocket.subscribe(gone, "late-chan")
    assert warpsocket.close(gone) is True
    # From the moment a connection is closing it counts as gone (docs/api.md#closing).
    with pytest.raises(ValueError, match="socket_id"):
        warpsocket.create_virtual_socket(gone, "late:")
    assert warpsocket.subscribe(gone, "other-chan") == []
    assert warpsocket.has_subscriptions("late-chan") is False
    expect_close(a.ws)
    wait_for(lambda: warpsocket.stats()["connections"] == 0, message="connection gone")
    with pytest.raises(ValueError, match="socket_id"):
        warpsocket.create_virtual_socket(gone)
    wait_for(lambda: warpsocket.stats()["virtual_sockets"] == 0, message="no virtual sockets left")
    wait_for(lambda: warpsocket.stats()["subscriptions"] == 0, message="no subscriptions left")


@pytest.mark.parametrize(
    ("call", "exc", "argname"),
    [
        (lambda: warpsocket.create_virtual_socket(True), TypeError, "socket_id"),
        (lambda: warpsocket.create_virtual_socket("1"), TypeError, "socket_id"),
        (lambda: warpsocket.create_virtual_socket(None), TypeError, "socket_id"),
        (lambda: warpsocket.create_virtual_socket(1.0), TypeError, "socket_id"),
        (lambda: warpsocket.create_virtual_socket(1, 5), TypeError, "user_prefix"),
        (lambda: warpsocket.delete_virtual_socket(True), TypeError, "virtual_socket_id"),
        (lambda: warpsocket.delete_virtual_socket("x"), TypeError, "virtual_socket_id"),
        (lambda: warpsocket.delete_virtual_socket(0), ValueError, "virtual_socket_id"),
        (lambda: warpsocket.delete_virtual_socket(-1), ValueError, "virtual_socket_id"),
        (lambda: warpsocket.delete_virtual_socket(5, True), TypeError, "expected_target"),
        (lambda: warpsocket.delete_virtual_socket(5, "x"), TypeError, "expected_target"),
        (lambda: warpsocket.delete_virtual_socket(5, 0), ValueError, "expected_target"),
    ],
    ids=[
        "create-bool",
        "create-str",
        "create-none",
        "create-float",
        "create-prefix-int",
        "delete-bool",
        "delete-str",
        "delete-zero",
        "delete-negative",
        "delete-expected-bool",
        "delete-expected-str",
        "delete-expected-zero",
    ],
)
def test_bad_arguments(server, call, exc, argname):
    before = vcount()
    with pytest.raises(exc) as info:
        call()
    assert argname in str(info.value), f"message should name {argname!r}: {info.value}"
    assert vcount() == before


# ---------------------------------------------------------------- handle_open


def test_virtual_socket_created_in_handle_open(server, make_client):
    a = make_client("/vjoin/news")
    b = make_client("/vjoin/news")
    vid_a = int(warpsocket.get_key(f"vid-of:{a.sid}"))
    vid_b = int(warpsocket.get_key(f"vid-of:{b.sid}"))
    assert len({a.sid, b.sid, vid_a, vid_b}) == 4
    assert vcount() == 2
    assert warpsocket.send("news", "flash") == 2
    assert a.received() == ["news>flash"]
    assert b.received() == ["news>flash"]
    # a handler sending to another connection's virtual socket
    assert ask(a.ws, f"sendto {vid_b} hi") == "sent 1"
    assert b.received() == ["news>hi"]


def test_virtual_socket_created_in_message_handler(server, make_client):
    a = make_client()
    vid = int(ask(a.ws, "mkv h:"))
    assert vid not in (a.sid,)
    assert warpsocket.send(vid, "x") == 1
    assert a.received() == ["h:x"]
    assert warpsocket.delete_virtual_socket(vid, expected_target=a.sid) is True


def test_refused_upgrade_undoes_virtual_sockets_and_subscriptions(server, make_client):
    a = make_client()
    warpsocket.subscribe(a.sid, "rf-direct")
    before = warpsocket.stats()
    with pytest.raises(InvalidStatus) as info:
        connect(server, "/vrefuse/rf")
    assert info.value.response.status_code == 403
    wait_for(
        lambda: warpsocket.stats()["subscriptions"] == before["subscriptions"],
        message="subscriptions undone",
    )
    wait_for(
        lambda: warpsocket.stats()["virtual_sockets"] == before["virtual_sockets"],
        message="virtual sockets undone",
    )
    stats = warpsocket.stats()
    assert stats["channels"] == before["channels"]
    assert stats["connections"] == before["connections"]
    assert warpsocket.has_subscriptions("rf-virtual") is False
    sid, vid, vid2 = (int(x) for x in warpsocket.get_key("refused:rf").split())
    assert warpsocket.send([sid, vid, vid2, "rf-virtual"], "x") == 0
    assert warpsocket.send("rf-direct", "only a") == 1
    for dead in (sid, vid, vid2):
        with pytest.raises(ValueError):
            warpsocket.create_virtual_socket(dead)
    assert a.received() == ["only a"]
