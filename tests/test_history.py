"""History and recovery in one process (docs/api.md#history): offsets, stamps, position,
history, recover, ttl, and the seam between kept and live messages under load.

Every test runs a real server and real ``websockets`` clients; the functions are called
from the test's threads and from handlers on the worker threads.
"""

from __future__ import annotations

import random
import re
import threading
import time

import pytest
import warpsocket
from helpers import IdClient, ServerProcess, connect, free_port, wait_for, warpsocket_command
from warpsocket import History, cli

WORKER = """
import warpsocket

def handle_text_message(text, socket_id):
    cmd, _, rest = text.partition(" ")
    if cmd == "id":
        warpsocket.send(socket_id, str(socket_id))
    elif cmd == "spam":
        channel, count, tag = rest.split(" ")
        for i in range(int(count)):
            warpsocket.send(channel, f"{tag}-{i}")
        warpsocket.send(socket_id, "done")
    elif cmd == "recover":
        channel, epoch, offset = rest.split(" ")
        ok = warpsocket.recover(socket_id, channel, (epoch, int(offset)))
        warpsocket.send(socket_id, f"recovered {ok}")
    else:
        warpsocket.send(socket_id, text)

def handle_binary_message(data, socket_id):
    warpsocket.send(socket_id, data)
"""

STAMP = re.compile(r"^(\d+):(.*)$", re.S)


@pytest.fixture
def start(start_server):
    def _start(history, **kwargs):
        return start_server(WORKER, history=history, **kwargs)

    return _start


def offset_of(message):
    """The offset of a stamped text delivery, and the data after it."""
    match = STAMP.match(message)
    assert match, message
    return int(match.group(1)), match.group(2)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ([("a", (1,))], TypeError),
        ({"a": 5}, TypeError),
        ({"a": [5]}, TypeError),
        ({1: (5,)}, TypeError),
        ({"a": ()}, ValueError),
        ({"a": (1, 2.0, True, 4)}, ValueError),
        ({"a": (0,)}, ValueError),
        ({"a": (True,)}, TypeError),
        ({"a": (1, 0)}, ValueError),
        ({"a": (1, -1.0)}, ValueError),
        ({"a": (1, float("inf"))}, ValueError),
        ({"a": (1, "5")}, TypeError),
        ({"a": (1, 1.0, "yes")}, TypeError),
        ({"a\ud800": (1,)}, ValueError),
    ],
)
def test_bad_policies_name_history(write_worker, value, error):
    with pytest.raises(error, match="history"):
        warpsocket.start(bind="127.0.0.1:0", worker=str(write_worker(WORKER)), history=value)


def test_history_flag_makes_the_option():
    parser = cli.build_parser()
    args = parser.parse_args(["w.py", "--history", "room:=100/30", "--history", "=5", "--history", "a=b=7"])
    assert args.history == {"room:": History(100, 30.0), "": History(5, 300.0), "a=b": History(7)}
    assert parser.parse_args(["w.py"]).history is None
    for bad in ["room", "room:=0", "room:=x", "room:=5/0", "room:=5/inf", "room:=5/"]:
        with pytest.raises(SystemExit):
            parser.parse_args(["w.py", "--history", bad])


CLI_WORKER = """
import warpsocket

def handle_text_message(text, socket_id):
    warpsocket.subscribe(socket_id, "room:1")
    warpsocket.subscribe(socket_id, "lobby")
    warpsocket.send(["room:1", "lobby"], text)
"""


@pytest.mark.timeout(120)
def test_history_flag_runs_a_server_with_history(tmp_path):
    worker = tmp_path / "cli_history_worker.py"
    worker.write_text(CLI_WORKER)
    port = free_port()
    argv = warpsocket_command(worker, "--bind", f"127.0.0.1:{port}", "--history", "room:=10/60")
    server = ServerProcess(argv, cwd=tmp_path, port=port)
    try:
        server.wait_listening()
        with connect(f"ws://127.0.0.1:{port}/") as ws:
            ws.send("a")
            assert [ws.recv(timeout=20), ws.recv(timeout=20)] == ["1:a", "a"]
            ws.send("b")
            assert [ws.recv(timeout=20), ws.recv(timeout=20)] == ["2:b", "b"]
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.output()


def test_no_policy_no_history(start):
    start({"room:": History(10)})
    for call in (
        lambda: warpsocket.position("lobby"),
        lambda: warpsocket.history("lobby"),
        lambda: warpsocket.recover(1, "lobby", ("e", 0)),
    ):
        with pytest.raises(ValueError, match="channel"):
            call()
    assert warpsocket.send("lobby", "x") == 0


def test_bad_arguments_name_them(start):
    start({"": History(10)})
    for call, error, name in [
        (lambda: warpsocket.position(1.5), TypeError, "channel"),
        (lambda: warpsocket.history("c", "1"), TypeError, "since"),
        (lambda: warpsocket.history("c", True), TypeError, "since"),
        (lambda: warpsocket.history("c", -1), ValueError, "since"),
        (lambda: warpsocket.history("c", 0, -1), ValueError, "limit"),
        (lambda: warpsocket.history("c", 0, 1.0), TypeError, "limit"),
        (lambda: warpsocket.recover("c", "c", ("e", 0)), TypeError, "target"),
        (lambda: warpsocket.recover([1, "c"], "c", ("e", 0)), TypeError, "target"),
        (lambda: warpsocket.recover(True, "c", ("e", 0)), TypeError, "target"),
        (lambda: warpsocket.recover(0, "c", ("e", 0)), ValueError, "target"),
        (lambda: warpsocket.recover(1, None, ("e", 0)), TypeError, "channel"),
        (lambda: warpsocket.recover(1, "c", "e"), TypeError, "since"),
        (lambda: warpsocket.recover(1, "c", ("e",)), TypeError, "since"),
        (lambda: warpsocket.recover(1, "c", (1, 2)), TypeError, "since"),
        (lambda: warpsocket.recover(1, "c", ("e", "2")), TypeError, "since"),
        (lambda: warpsocket.recover(1, "c", ("e", -2)), ValueError, "since"),
        (lambda: warpsocket.recover(1, "c", ("\ud800", 2)), ValueError, "since"),
    ]:
        with pytest.raises(error, match=name):
            call()
    # Beyond any offset is not an error: nothing is after it.
    assert warpsocket.history("c", 10**30) == []
    assert warpsocket.history("c", 0, 10**30) == []


# ---------------------------------------------------------------- offsets and stamps


@pytest.mark.timeout(120)
def test_offsets_are_gapless_and_in_order_from_many_threads(start):
    server = start({"room:": History(10_000)}, threads=4)
    channel = "room:busy"
    subscribers = [IdClient(server) for _ in range(2)]
    senders = [IdClient(server) for _ in range(3)]
    for client in subscribers:
        assert warpsocket.subscribe(client.sid, channel) == [client.sid]
    per_sender = 300

    def spam(client, tag):
        client.ws.send(f"spam {channel} {per_sender} {tag}")
        assert client.recv(timeout=60) == "done"

    def spam_here():
        for i in range(per_sender):
            warpsocket.send(channel, f"main-{i}")

    threads = [threading.Thread(target=spam, args=(c, f"w{n}")) for n, c in enumerate(senders)]
    threads.append(threading.Thread(target=spam_here))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    total = per_sender * len(threads)
    epoch, last = warpsocket.position(channel)
    assert last == total
    assert isinstance(epoch, str) and epoch
    for client in subscribers:
        got = [offset_of(client.recv(timeout=30)) for _ in range(total)]
        assert [offset for offset, _ in got] == list(range(1, total + 1))
        # Each sender's own messages keep their order too.
        by_tag: dict[str, list[int]] = {}
        for _, data in got:
            tag, _, i = data.rpartition("-")
            by_tag.setdefault(tag, []).append(int(i))
        assert by_tag == {tag: list(range(per_sender)) for tag in ["w0", "w1", "w2", "main"]}
        assert warpsocket.history(channel) == got, "kept as sent, by offset"
    for client in subscribers + senders:
        client.close()


def test_stamps_text_binary_prefix_and_unstamped(start):
    server = start({"s:": History(10), "n:": History(10, stamp=False)})
    client = IdClient(server)
    virtual = warpsocket.create_virtual_socket(client.sid, "v|")
    warpsocket.subscribe([client.sid, virtual], "s:1")
    warpsocket.subscribe(client.sid, "n:1")
    assert warpsocket.send("s:1", "hello") == 2
    assert warpsocket.send("s:1", b"\x00bin") == 2
    assert warpsocket.send("n:1", "plain") == 1
    assert warpsocket.send(client.sid, "direct") == 1
    got = client.received()
    assert sorted(got[:2]) == ["1:hello", "v|1:hello"]
    assert sorted(got[2:4]) == [b"2:\x00bin", b"v|2:\x00bin"]
    assert got[4:] == ["plain", "direct"]
    # What is kept is the data as sent: no prefix, no stamp.
    assert warpsocket.history("s:1") == [(1, "hello"), (2, b"\x00bin")]
    assert warpsocket.history("n:1") == [(1, "plain")]
    assert warpsocket.position("n:1")[1] == 1
    # stats() byte counts include the stamp: "3:abc" is 5 bytes.
    before = warpsocket.stats()["bytes_out"]
    warpsocket.unsubscribe(virtual, "s:1")
    assert warpsocket.send("s:1", "abc") == 1
    assert warpsocket.stats()["bytes_out"] - before == 5
    assert client.received() == ["3:abc"]
    client.close()


def test_compression_happens_after_stamping(start):
    server = start({"z:": History(10)}, compression=True)
    with connect(server, compression="deflate") as ws:
        ws.send("id")
        sid = int(ws.recv(timeout=20))
        warpsocket.subscribe(sid, "z:1")
        payload = "compress me " * 200
        before = warpsocket.stats()["messages_compressed"]
        assert warpsocket.send("z:1", payload) == 1
        assert ws.recv(timeout=20) == "1:" + payload
        assert warpsocket.stats()["messages_compressed"] == before + 1


# ---------------------------------------------------------------- position, history, ttl


def test_position_history_since_and_limit(start):
    start({"h:": History(3), "": History(100)})
    epoch, offset = warpsocket.position("h:1")
    assert offset == 0 and epoch
    for i in range(1, 6):
        assert warpsocket.send("h:1", f"m{i}") == 0
    assert warpsocket.position("h:1") == (epoch, 5), "same sequence: same epoch"
    assert warpsocket.history("h:1") == [(3, "m3"), (4, "m4"), (5, "m5")], "the last size"
    assert warpsocket.history("h:1", 3) == [(4, "m4"), (5, "m5")]
    assert warpsocket.history("h:1", since=0, limit=2) == [(3, "m3"), (4, "m4")]
    assert warpsocket.history("h:1", limit=0) == []
    assert warpsocket.history("h:1", 5) == []
    assert warpsocket.history(b"h:1", 4) == [(5, "m5")], "bytes and str name one channel"
    # The longest prefix wins: "other" falls under "" and keeps 100.
    for i in range(10):
        warpsocket.send("other", str(i))
    assert len(warpsocket.history("other")) == 10
    # Each channel its own sequence and epoch.
    assert warpsocket.position("other")[0] != epoch
    stats = warpsocket.stats()
    assert stats["history_channels"] >= 2
    assert stats["history_messages"] >= 13


def test_a_target_list_gives_each_channel_its_offset(start):
    server = start({"l:": History(10)})
    client = IdClient(server)
    warpsocket.subscribe(client.sid, "l:a")
    warpsocket.subscribe(client.sid, "l:b")
    warpsocket.send("l:b", "first")
    assert warpsocket.send(["l:a", "l:b", client.sid], "x") == 3
    assert client.received() == ["1:first", "1:x", "2:x", "x"]
    client.close()


def test_ttl_expiry_starts_a_new_sequence_and_frees_memory(start):
    start({"t:": History(10, ttl=0.5)})
    warpsocket.send("t:1", "a")
    epoch, offset = warpsocket.position("t:1")
    assert offset == 1
    assert warpsocket.history("t:1") == [(1, "a")]
    new_epoch = wait_for(
        lambda: (p := warpsocket.position("t:1"))[0] != epoch and p, timeout=10, message="a new epoch"
    )
    assert new_epoch[1] == 0
    assert warpsocket.history("t:1") == []
    assert warpsocket.recover(1, "t:1", (epoch, 1)) is False
    # Nobody touches "t:2": the sweep returns its memory.
    warpsocket.send("t:2", "b")
    wait_for(
        lambda: warpsocket.stats()["history_messages"] == 0 and warpsocket.stats()["history_channels"] <= 1,
        timeout=10,
        message="expired history swept",
    )


def test_start_after_stop_starts_new_sequences(start_server, write_worker):
    worker = str(write_worker(WORKER))
    server = start_server(worker=worker, history={"": History(5)})
    warpsocket.send("c", "x")
    first = warpsocket.position("c")
    assert first[1] == 1
    server.stop()
    with pytest.raises(ValueError, match="channel"):
        warpsocket.position("c")
    assert warpsocket.stats()["history_channels"] == 0
    start_server(worker=worker, history={"": History(5)})
    epoch, offset = warpsocket.position("c")
    assert offset == 0 and epoch != first[0]


# ---------------------------------------------------------------- recover


def test_recover_true_delivers_what_was_missed_then_live(start):
    server = start({"r:": History(5)})
    channel = "r:1"
    for i in range(1, 4):
        warpsocket.send(channel, f"m{i}")
    epoch, last = warpsocket.position(channel)
    assert last == 3
    client = IdClient(server)
    virtual = warpsocket.create_virtual_socket(client.sid, "v|")
    assert warpsocket.recover(client.sid, channel, (epoch, 1)) is True
    assert warpsocket.recover([virtual, virtual], channel, [epoch, 3]) is True, "nothing missed"
    warpsocket.send(channel, "m4")
    got = client.received()
    assert got[:2] == ["2:m2", "3:m3"]
    assert sorted(got[2:]) == ["4:m4", "v|4:m4"]
    # Subscribed as by subscribe(target, channel): once more is a count of 2.
    assert warpsocket.unsubscribe(client.sid, channel) == [client.sid]
    assert warpsocket.unsubscribe(virtual, channel) == []
    assert warpsocket.unsubscribe(virtual, channel) == [virtual]
    # From a handler, on a worker thread.
    other = IdClient(server)
    other.ws.send(f"recover {channel} {epoch} 2")
    assert other.recv() == "3:m3"
    assert other.recv() == "4:m4"
    assert other.recv() == "recovered True"
    client.close()
    other.close()


def test_recover_false_delivers_nothing_but_subscribes(start):
    server = start({"r:": History(5)})
    channel = "r:2"
    for i in range(1, 11):
        warpsocket.send(channel, f"m{i}")
    assert warpsocket.position(channel)[1] == 10  # kept: 6..10
    # Each case sends one more message: since is taken from the position at the time.
    cases = [
        ("another epoch", lambda epoch, last: ("not-" + epoch, last - 2)),
        ("a gap beyond size", lambda epoch, last: (epoch, last - 6)),
        ("above the last", lambda epoch, last: (epoch, last + 1)),
    ]
    for why, since in cases:
        client = IdClient(server)
        assert warpsocket.recover(client.sid, channel, since(*warpsocket.position(channel))) is False, why
        assert client.received() == [], why
        warpsocket.send(channel, "live")
        _, now = warpsocket.position(channel)
        assert client.received() == [f"{now}:live"], why
        client.close()
    epoch, last = warpsocket.position(channel)
    client = IdClient(server)
    assert warpsocket.recover(client.sid, channel, (epoch, last - 5)) is True, "exactly the kept ones"
    assert [offset_of(m)[0] for m in client.received()] == list(range(last - 4, last + 1))
    client.close()


@pytest.mark.timeout(180)
def test_the_seam_loses_and_repeats_nothing_under_continuous_sends(start):
    """Hundreds of recovers while threads send without pause: every recovered socket
    sees every offset after its ``since`` exactly once, in order, kept then live."""
    server = start({"seam:": History(1_000_000)}, threads=3)
    channel = "seam:1"
    connections = [IdClient(server) for _ in range(4)]
    spammer = IdClient(server)
    stop = threading.Event()
    done = "~done~"

    def send_forever(n):
        while not stop.is_set():
            for _ in range(10):
                warpsocket.send(channel, f"t{n}")
            time.sleep(0)  # let the other threads have the GIL

    received: list[list[str]] = [[] for _ in connections]

    def read(conn, into):
        # Read while it all happens, so that no outbox nears max_backpressure.
        while (message := conn.recv(timeout=60)) != done:
            into.append(message)

    readers = [threading.Thread(target=read, args=(c, r)) for c, r in zip(connections, received, strict=True)]
    senders = [threading.Thread(target=send_forever, args=(n,)) for n in range(2)]
    for thread in readers + senders:
        thread.start()
    rng = random.Random(7)
    recovered: dict[str, tuple[int, int]] = {}
    alive: list[tuple[int, int]] = []
    try:
        wait_for(lambda: warpsocket.position(channel)[1] > 100, message="sends under way")
        # And from a worker thread, through a handler.
        spammer.ws.send(f"spam {channel} 20000 w")
        start_offset = warpsocket.position(channel)[1]
        for i in range(200):
            conn = connections[i % len(connections)]
            prefix = f"v{i}|"
            virtual = warpsocket.create_virtual_socket(conn.sid, prefix)
            epoch, last = warpsocket.position(channel)
            since = max(0, last - rng.randint(0, 40))
            assert warpsocket.recover(virtual, channel, (epoch, since)) is True
            recovered[prefix] = (since, last)
            alive.append((virtual, conn.sid))
            if len(alive) > 4:
                gone, target = alive.pop(0)
                assert warpsocket.delete_virtual_socket(gone, target)
            # Give the senders the GIL now and then: this loop alone would keep it.
            time.sleep(0.002)
        end_offset = warpsocket.position(channel)[1]
    finally:
        stop.set()
        for thread in senders:
            thread.join(30)
        for virtual, target in alive:
            warpsocket.delete_virtual_socket(virtual, target)
        for conn in connections:
            warpsocket.send(conn.sid, done)
        for thread in readers:
            thread.join(60)
    assert spammer.recv(timeout=60) == "done"
    sent_meanwhile = end_offset - start_offset
    assert sent_meanwhile > 200, "sends ran during the recovers"
    seen: dict[str, list[int]] = {prefix: [] for prefix in recovered}
    for messages in received:
        for message in messages:
            prefix, bar, rest = message.partition("|")
            assert bar, message
            seen[prefix + "|"].append(offset_of(rest)[0])
    live_after = 0
    for prefix, (since, last) in recovered.items():
        offsets = seen[prefix]
        assert len(offsets) >= last - since, (prefix, "every kept message")
        assert offsets == list(range(since + 1, since + 1 + len(offsets))), (prefix, since, offsets[:50])
        live_after += bool(offsets) and offsets[-1] > last
    assert live_after > 100, f"only {live_after} recovers were followed by live messages"
    for client in [*connections, spammer]:
        client.close()
