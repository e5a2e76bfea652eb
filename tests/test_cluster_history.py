"""History channels in cluster mode (docs/api.md#history): Redis sequences every history
channel's messages, keeps them, and any node recovers them.

Nodes are ``python -m warpsocket`` processes with the control worker of test_cluster.py
(plus ``burst``), started with ``--history 'room:=...'`` on one real redis-server.
"""

from __future__ import annotations

import random
import re
import threading

import pytest
from helpers import wait_for
from test_cluster import CONTROL_WORKER, Nodes

WORKER = (
    CONTROL_WORKER
    + r'''

def burst(channel, count, tag):
    """Send ``count`` messages ``tag:i`` to ``channel`` from this worker, as fast as it can."""
    return sum(warpsocket.send(channel, f"{tag}:{i}") for i in range(count))


warpsocket.burst = burst
'''
)

STAMP = re.compile(r"(\d+):(.*)", re.DOTALL)


@pytest.fixture
def nodes(redis, write_worker):
    """``nodes(n, size=1000) -> [Node, ...]`` with history on ``room:``; all stopped at teardown."""
    pool = Nodes(write_worker(WORKER, name="history_control_worker.py"), redis.url)

    def _start(count, size=1000, ttl=300):
        return pool(count, "--history", f"room:={size}/{ttl}")

    _start.client = pool.client
    yield _start
    pool.stop()


def listeners(redis, channel):
    out = redis.cli("PUBSUB", "NUMSUB", f"warpsocket:h:{channel}").splitlines()
    return int(out[1]) if len(out) == 2 else -1


def wait_history_listeners(redis, channel, count):
    wait_for(lambda: listeners(redis, channel) == count, timeout=30,
             message=f"{count} nodes listening on history channel {channel!r}")  # fmt: skip


def stamped(message):
    """``(offset, data)`` of a stamped delivery."""
    match = STAMP.fullmatch(message)
    assert match, f"not stamped: {message!r}"
    return int(match.group(1)), match.group(2)


def receive_stamped(client, count):
    return [stamped(client.received()) for _ in range(count)]


@pytest.mark.timeout(300)
def test_offsets_are_cluster_wide_and_every_node_delivers_in_offset_order(nodes, redis):
    a, b = nodes(2)
    on_a, on_b = nodes.client(a), nodes.client(b)
    send_a, send_b = nodes.client(a), nodes.client(b)
    for client in (on_a, on_b):
        client.call("subscribe", "$me", "room:1")
    wait_history_listeners(redis, "room:1", 2)
    # Two nodes send at once: Redis orders them, and both subscribers see that one order.
    threads = [
        threading.Thread(target=sender.call, args=("burst", "room:1", 150, tag))
        for sender, tag in ((send_a, "a"), (send_b, "b"))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    got_a = receive_stamped(on_a, 300)
    got_b = receive_stamped(on_b, 300)
    assert [offset for offset, _ in got_a] == list(range(1, 301))
    assert got_a == got_b
    for tag in "ab":
        assert [d for _, d in got_a if d.startswith(tag)] == [f"{tag}:{i}" for i in range(150)]
    epoch, last = on_a.call("position", "room:1")
    assert last == 300 and epoch
    assert on_b.call("position", "room:1") == [epoch, 300]
    # What a node keeps is nothing: Redis keeps it, and any node reads it.
    assert on_a.call("history", "room:1", 298) == [[299, got_a[298][1]], [300, got_a[299][1]]]
    assert on_b.call("history", "room:1", 0, 2) == [[1, got_a[0][1]], [2, got_a[1][1]]]
    # A socket id is never stamped nor kept; other channels are unchanged.
    assert send_a.call("send", on_b.id, "direct") == 1
    assert on_b.received() == "direct"
    assert on_a.call("position", "room:1") == [epoch, 300]
    assert on_a.reply("position", "lobby")["error"] == "ValueError"


@pytest.mark.timeout(300)
def test_recover_on_any_node_replays_what_another_node_sent(nodes, redis):
    a, b = nodes(2)
    sender = nodes.client(a)
    epoch, start = sender.call("position", "room:2")
    assert start == 0
    for i in range(10):
        sender.call("send", "room:2", f"m{i}")
    late = nodes.client(b)
    assert late.call("recover", "$me", "room:2", [epoch, 4]) is True
    assert receive_stamped(late, 6) == [(o, f"m{o - 1}") for o in range(5, 11)]
    # Then the live ones, from either node, once each.
    wait_history_listeners(redis, "room:2", 1)
    sender.call("send", "room:2", "live")
    assert stamped(late.received()) == (11, "live")
    # Another epoch, or an offset beyond the last: False, nothing replayed, still subscribed.
    other = nodes.client(a)
    assert other.call("recover", "$me", "room:2", ["not-the-epoch", 3]) is False
    assert other.call("recover", "$me", "room:2", [epoch, 999]) is False
    late.call("send", "room:2", "after")
    assert stamped(other.received()) == (12, "after"), "one subscription, counted twice"
    assert stamped(late.received()) == (12, "after")
    # A socket on another node: the node that owns it recovers it.
    remote = nodes.client(a)
    assert late.call("recover", remote.id, "room:2", [epoch, 10]) is True
    assert receive_stamped(remote, 2) == [(11, "live"), (12, "after")]


@pytest.mark.timeout(300)
def test_only_the_last_size_messages_are_kept(nodes):
    (a,) = nodes(1, size=5)
    client = nodes.client(a)
    epoch, _ = client.call("position", "room:small")
    client.call("burst", "room:small", 12, "x")
    assert [o for o, _ in client.call("history", "room:small")] == [8, 9, 10, 11, 12]
    assert client.call("recover", "$me", "room:small", [epoch, 6]) is False
    assert client.call("recover", "$me", "room:small", [epoch, 7]) is True
    assert receive_stamped(client, 5) == [(o, f"x:{o - 1}") for o in range(8, 13)]


@pytest.mark.timeout(400)
def test_recovers_during_continuous_sends_on_another_node_miss_and_repeat_nothing(nodes, redis):
    a, b = nodes(2)
    sender, watcher = nodes.client(a), nodes.client(b)
    epoch, _ = watcher.call("position", "room:busy")
    stop = threading.Event()
    sent = []

    def send_forever():
        # Up to 2,000 messages a second: enough that the nodes' pub/sub streams lag
        # behind the recovers' reads, not so many that the machine does nothing else.
        while not stop.wait(0.01):
            sender.call("burst", "room:busy", 20, f"s{len(sent)}")
            sent.append(20)

    thread = threading.Thread(target=send_forever)
    thread.start()
    try:
        rng = random.Random(25)
        wait_for(lambda: sum(sent) > 0, timeout=30, message="the first sends")
        for round_ in range(20):
            client = nodes.client(b if round_ % 2 else a)
            # Ten recovers per connection, each through its own virtual socket, so each
            # one's deliveries are told apart by their prefix: 200 recovers in all.
            starts = {}
            for k in range(10):
                last = watcher.call("position", "room:busy")[1]
                since = rng.randint(max(0, last - 200), last)
                prefix = f"v{k}|"
                virtual = client.call("create_virtual_socket", "$me", prefix)
                assert client.call("recover", virtual, "room:busy", [epoch, since]) is True
                starts[prefix] = since
            # Everything after each `since` up to a live point, gapless and once each.
            target = watcher.call("position", "room:busy")[1] + 5
            got = {prefix: [] for prefix in starts}
            while any(not offsets or offsets[-1] < target for offsets in got.values()):
                prefix, _, rest = client.received().partition("|")
                got[prefix + "|"].append(stamped(rest)[0])
            for prefix, offsets in got.items():
                expected = list(range(starts[prefix] + 1, offsets[-1] + 1))
                missing = sorted(set(expected) - set(offsets))
                repeated = sorted(o for o in set(offsets) if offsets.count(o) > 1)
                assert offsets == expected, (
                    f"round {round_} {prefix}: missing {missing}, repeated {repeated}, since {starts[prefix]}"
                )
            client.close()
    finally:
        stop.set()
        thread.join(60)


@pytest.mark.timeout(300)
def test_redis_outage_refuses_history_calls_and_a_lost_sequence_has_a_new_epoch(nodes, redis):
    (a,) = nodes(1)
    client, other = nodes.client(a), nodes.client(a)
    client.call("subscribe", "$me", "room:3")
    wait_history_listeners(redis, "room:3", 1)
    epoch, _ = client.call("position", "room:3")
    assert client.call("send", "room:3", "kept") == 2  # 1 handed to Redis + 1 local subscriber
    assert stamped(client.received()) == (1, "kept")

    redis.kill()
    wait_for(lambda: other.call("send", "room:3", "lost") == 0, timeout=30,
             message="the node to notice Redis is gone")  # fmt: skip
    assert other.call("stats")["cluster_send_failures"] >= 1
    for call in (("position", "room:3"), ("history", "room:3"), ("recover", "$me", "room:3", [epoch, 1])):
        assert other.reply(*call)["error"] == "ConnectionError", call
    # A message sent while Redis was down reached nobody, not even this node's subscriber.
    assert other.call("send", client.id, "direct") == 1
    assert client.received() == "direct"

    redis.start()  # without its data: the sequence is lost
    # Both connections back: the command one (position answers) and the pub/sub one,
    # which recover needs and which may still be in its reconnect backoff.
    wait_for(lambda: other.call("stats")["redis_connected"] == 1, timeout=30,
             message="the node's pub/sub connection to Redis again")  # fmt: skip
    wait_for(lambda: other.reply("position", "room:3").get("result") is not None, timeout=30,
             message="the node to reach Redis again")  # fmt: skip
    new_epoch, last = other.call("position", "room:3")
    assert new_epoch != epoch and last == 0
    assert other.call("recover", "$me", "room:3", [epoch, 1]) is False
    wait_history_listeners(redis, "room:3", 1)
    wait_for(lambda: other.call("send", "room:3", "again") > 0, timeout=30,
             message="sends to reach Redis again")  # fmt: skip
    first = stamped(other.received())
    assert first[1] == "again"
    assert stamped(client.received()) == first
