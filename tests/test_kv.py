"""The key/value store: get_key, set_key, set_key_if, stats()["keys"], lifetime.

The store lives as long as the process, so every test uses keys with a unique prefix.
"""

from __future__ import annotations

import contextlib
import uuid

import pytest
import warpsocket
from helpers import ask, connect, wait_for

KV_WORKER = """
import warpsocket

def handle_text_message(text, socket_id):
    cmd, _, rest = text.partition(" ")
    if cmd == "id":
        warpsocket.send(socket_id, str(socket_id))
    elif cmd == "get":
        value = warpsocket.get_key(rest)
        warpsocket.send(socket_id, "None" if value is None else "=" + value.decode())
    elif cmd == "set":
        key, _, value = rest.partition(" ")
        prev = warpsocket.set_key(key, value)
        warpsocket.send(socket_id, "None" if prev is None else "=" + prev.decode())
    elif cmd == "del":
        prev = warpsocket.set_key(rest, None)
        warpsocket.send(socket_id, "None" if prev is None else "=" + prev.decode())
    elif cmd == "cas":
        key, new, check = rest.split(" ")
        ok = warpsocket.set_key_if(key, None if new == "-" else new, None if check == "-" else check)
        warpsocket.send(socket_id, str(ok))
    elif cmd == "incr":
        # a CAS retry loop run inside the worker
        key, _, times = rest.partition(" ")
        for _ in range(int(times)):
            while True:
                old = warpsocket.get_key(key)
                new = str(int(old or b"0") + 1)
                if warpsocket.set_key_if(key, new, old):
                    break
        warpsocket.send(socket_id, "done")
"""


@pytest.fixture
def k():
    """A function making process-unique key names."""
    prefix = f"kvtest-{uuid.uuid4().hex}-"
    return lambda name: prefix + name


# ---------------------------------------------------------------- without a server


def test_get_missing_key_is_none(k):
    assert warpsocket.get_key(k("missing")) is None
    assert warpsocket.get_key(k("missing").encode()) is None


def test_set_key_returns_previous_value_as_bytes(k):
    key = k("a")
    assert warpsocket.set_key(key, "v1") is None
    prev = warpsocket.set_key(key, "v2")
    assert prev == b"v1"
    assert type(prev) is bytes
    value = warpsocket.get_key(key)
    assert value == b"v2"
    assert type(value) is bytes
    assert warpsocket.set_key(key, b"\x00\xff raw") == b"v2"
    assert warpsocket.set_key(key, bytearray(b"ba")) == b"\x00\xff raw"
    assert warpsocket.set_key(key, memoryview(b"__mv")[2:]) == b"ba"
    assert warpsocket.get_key(key) == b"mv"
    assert warpsocket.set_key(key, "ü€") == b"mv"
    assert warpsocket.get_key(key) == "ü€".encode()
    assert warpsocket.set_key(key) == "ü€".encode()  # value=None by default: delete
    assert warpsocket.get_key(key) is None


def test_value_none_deletes(k):
    key = k("del")
    warpsocket.set_key(key, "x")
    assert warpsocket.set_key(key, None) == b"x"
    assert warpsocket.get_key(key) is None
    assert warpsocket.set_key(key, None) is None  # deleting an absent key
    assert warpsocket.set_key(key, value=None) is None
    assert warpsocket.get_key(key) is None


def test_empty_value_is_a_value(k):
    key = k("empty")
    assert warpsocket.set_key(key, "") is None
    assert warpsocket.get_key(key) == b""
    assert warpsocket.set_key(key, b"") == b""
    assert warpsocket.set_key_if(key, "full", b"") is True
    assert warpsocket.get_key(key) == b"full"
    assert warpsocket.set_key_if(key, "", "full") is True
    assert warpsocket.get_key(key) == b""
    assert warpsocket.set_key_if(key, "x", None) is False  # present (empty), not absent
    assert warpsocket.set_key(key) == b""
    assert warpsocket.get_key(key) is None


def test_str_and_bytes_keys_are_the_same(k):
    key = k("same-ü")
    warpsocket.set_key(key, "1")
    assert warpsocket.get_key(key.encode()) == b"1"
    assert warpsocket.get_key(bytearray(key.encode())) == b"1"
    assert warpsocket.get_key(memoryview(key.encode())) == b"1"
    assert warpsocket.set_key(key.encode(), "2") == b"1"
    assert warpsocket.get_key(key) == b"2"
    assert warpsocket.set_key_if(key.encode(), "3", "2") is True
    assert warpsocket.get_key(key) == b"3"
    assert warpsocket.set_key(bytearray(key.encode())) == b"3"
    assert warpsocket.get_key(key) is None


def test_binary_keys_and_large_values(k):
    key = k("bin").encode() + b"\x00\xff\xfe"
    big = bytes(range(256)) * 4096  # 1 MiB
    assert warpsocket.set_key(key, big) is None
    assert warpsocket.get_key(key) == big
    assert warpsocket.get_key(key[:-1]) is None
    assert warpsocket.set_key(key, None) == big


def test_set_key_if_absent(k):
    key = k("cas-absent")
    assert warpsocket.set_key_if(key, "first") is True  # check_value=None: only if absent
    assert warpsocket.get_key(key) == b"first"
    assert warpsocket.set_key_if(key, "second") is False
    assert warpsocket.set_key_if(key, "second", None) is False
    assert warpsocket.get_key(key) == b"first"


def test_set_key_if_compare(k):
    key = k("cas")
    assert warpsocket.set_key_if(key, "x", "anything") is False  # absent never matches a value
    assert warpsocket.get_key(key) is None
    warpsocket.set_key(key, "a")
    assert warpsocket.set_key_if(key, "b", "wrong") is False
    assert warpsocket.get_key(key) == b"a"
    assert warpsocket.set_key_if(key, "b", "a") is True
    assert warpsocket.get_key(key) == b"b"
    assert warpsocket.set_key_if(key, new_value=b"c", check_value=b"b") is True
    assert warpsocket.get_key(key) == b"c"
    assert warpsocket.set_key_if(key, bytearray(b"d"), memoryview(b"c")) is True
    assert warpsocket.get_key(key) == b"d"
    # a prefix or an extension of the value does not match
    assert warpsocket.set_key_if(key, "e", "") is False
    assert warpsocket.set_key_if(key, "e", "dd") is False
    assert warpsocket.get_key(key) == b"d"


def test_set_key_if_delete(k):
    key = k("cas-del")
    warpsocket.set_key(key, "v")
    assert warpsocket.set_key_if(key, None, "other") is False  # mismatch: nothing deleted
    assert warpsocket.get_key(key) == b"v"
    assert warpsocket.set_key_if(key, None, "v") is True  # success with new None deletes
    assert warpsocket.get_key(key) is None
    assert warpsocket.set_key_if(key, None, "v") is False
    # new None and check None on an absent key: succeeds, and the key stays absent
    assert warpsocket.set_key_if(key) is True
    assert warpsocket.get_key(key) is None
    warpsocket.set_key(key, "back")
    assert warpsocket.set_key_if(key) is False  # present: check None fails
    assert warpsocket.get_key(key) == b"back"
    warpsocket.set_key(key)


def test_stats_keys_count(k):
    before = warpsocket.stats()["keys"]
    warpsocket.set_key(k("s1"), "1")
    warpsocket.set_key(k("s2"), "2")
    assert warpsocket.set_key_if(k("s3"), "3") is True
    assert warpsocket.stats()["keys"] == before + 3
    warpsocket.set_key(k("s1"), "overwrite")
    warpsocket.set_key(k("s1").encode(), "same key as bytes")
    assert warpsocket.set_key_if(k("s2"), "x", "2") is True
    assert warpsocket.stats()["keys"] == before + 3
    warpsocket.set_key(k("s1"))
    assert warpsocket.set_key_if(k("s2"), None, "x") is True
    assert warpsocket.set_key_if(k("s3"), None, "wrong") is False
    assert warpsocket.stats()["keys"] == before + 1
    warpsocket.set_key(k("never-set"))  # deleting an absent key
    assert warpsocket.stats()["keys"] == before + 1
    warpsocket.set_key(k("s3"))
    assert warpsocket.stats()["keys"] == before


@pytest.mark.parametrize(
    ("call", "exc", "argname"),
    [
        (lambda: warpsocket.get_key(None), TypeError, "key"),
        (lambda: warpsocket.get_key(5), TypeError, "key"),
        (lambda: warpsocket.get_key(["a"]), TypeError, "key"),
        (lambda: warpsocket.set_key(None, "v"), TypeError, "key"),
        (lambda: warpsocket.set_key(1, "v"), TypeError, "key"),
        (lambda: warpsocket.set_key("kvtest-bad", 5), TypeError, "value"),
        (lambda: warpsocket.set_key("kvtest-bad", True), TypeError, "value"),
        (lambda: warpsocket.set_key_if(None, "v"), TypeError, "key"),
        (lambda: warpsocket.set_key_if("kvtest-bad", 5), TypeError, "new_value"),
        (lambda: warpsocket.set_key_if("kvtest-bad", "v", 5), TypeError, "check_value"),
    ],
    ids=[
        "get-none",
        "get-int",
        "get-list",
        "set-key-none",
        "set-key-int",
        "set-value-int",
        "set-value-bool",
        "cas-key-none",
        "cas-new-int",
        "cas-check-int",
    ],
)
def test_bad_arguments(call, exc, argname):
    before = warpsocket.stats()["keys"]
    with pytest.raises(exc) as info:
        call()
    assert argname in str(info.value), f"message should name {argname!r}: {info.value}"
    assert warpsocket.get_key("kvtest-bad") is None
    assert warpsocket.stats()["keys"] == before


# ---------------------------------------------------------------- with a server


@pytest.fixture
def server(start_server):
    return start_server(KV_WORKER, threads=2)


def test_kv_shared_between_workers_and_test_thread(server, k):
    key = k("shared")
    with connect(server) as a, connect(server) as b:
        # two connections go round-robin to the two workers
        assert int(ask(a, "id")) != int(ask(b, "id"))
        workers = warpsocket.stats()["workers"]
        assert sorted(w["connections"] for w in workers) == [1, 1]
        assert ask(a, f"get {key}") == "None"
        assert ask(a, f"set {key} from-a") == "None"
        assert ask(b, f"get {key}") == "=from-a"
        assert warpsocket.get_key(key) == b"from-a"
        assert warpsocket.set_key(key, "from-test") == b"from-a"
        assert ask(b, f"set {key} from-b") == "=from-test"
        assert ask(a, f"cas {key} x wrong") == "False"
        assert ask(a, f"cas {key} x from-b") == "True"
        assert warpsocket.get_key(key) == b"x"
        assert ask(b, f"cas {key} - x") == "True"
        assert warpsocket.get_key(key) is None
        assert ask(b, f"cas {key} y -") == "True"
        assert ask(a, f"cas {key} z -") == "False"
        assert ask(a, f"del {key}") == "=y"
        assert warpsocket.get_key(key) is None


def test_cas_loops_in_two_workers_and_the_test_thread(server, k):
    key = k("counter")
    with connect(server) as a, connect(server) as b:
        a.send(f"incr {key} 2000")
        b.send(f"incr {key} 2000")
        for _ in range(2000):
            while True:
                old = warpsocket.get_key(key)
                if warpsocket.set_key_if(key, str(int(old or b"0") + 1), old):
                    break
        assert a.recv(timeout=60) == "done"
        assert b.recv(timeout=60) == "done"
    assert warpsocket.get_key(key) == b"6000"


def test_kv_survives_restart_but_connections_channels_do_not(start_server, k):
    key = k("persist")
    server = start_server(KV_WORKER, threads=2)
    ws = connect(server)
    try:
        sid = int(ask(ws, "id"))
        assert ask(ws, f"set {key} kept") == "None"
        assert warpsocket.subscribe(sid, k("chan")) == [sid]
        vid = warpsocket.create_virtual_socket(sid, "v:")
        warpsocket.subscribe(vid, k("vchan"))
        stats = warpsocket.stats()
        assert stats["connections"] == 1
        assert stats["virtual_sockets"] == 1
        assert stats["subscriptions"] == 2
        keys_before = stats["keys"]
        server.stop(timeout=10)
    finally:
        with contextlib.suppress(Exception):
            ws.close()
    # after stop(): kv still answers, no connections
    assert warpsocket.get_key(key) == b"kept"
    assert warpsocket.send(sid, "x") == 0
    assert warpsocket.set_key(k("while-stopped"), "s") is None
    stats = warpsocket.stats()
    assert stats["connections"] == 0
    assert stats["keys"] == keys_before + 1

    server2 = start_server(KV_WORKER, threads=2)
    stats = warpsocket.stats()
    assert stats["connections"] == 0
    assert stats["virtual_sockets"] == 0
    assert stats["channels"] == 0
    assert stats["subscriptions"] == 0
    assert stats["keys"] == keys_before + 1
    assert warpsocket.has_subscriptions(k("chan")) is False
    assert warpsocket.has_subscriptions(k("vchan")) is False
    assert warpsocket.send([sid, vid, k("chan"), k("vchan")], "x") == 0
    for old in (sid, vid):
        with pytest.raises(ValueError):
            warpsocket.create_virtual_socket(old)
    assert warpsocket.get_key(key) == b"kept"
    with connect(server2) as ws2:
        sid2 = int(ask(ws2, "id"))
        assert sid2 not in (sid, vid)  # ids are never reused within a process
        assert ask(ws2, f"get {key}") == "=kept"
        assert ask(ws2, f"get {k('while-stopped')}") == "=s"
    warpsocket.set_key(key)
    warpsocket.set_key(k("while-stopped"))
    wait_for(lambda: warpsocket.stats()["connections"] == 0, message="ws2 closed")
