"""Presence across a cluster (docs/api.md#presence): real nodes, a real redis-server.

Each node is a ``python -m warpsocket`` process with the control worker of
test_cluster.py plus a ``handle_presence`` that broadcasts every change it is told of on
the channel ``events`` as ``[channel, member, joined, node]``: an observer subscribed to
it sees every change reported anywhere in the cluster, and so can count them.
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
import time

import pytest
import warpsocket
from helpers import wait_for
from test_cluster import CONTROL_WORKER, Nodes, wait_listeners

PRESENCE_WORKER = (
    CONTROL_WORKER
    + r"""

def handle_presence(channel, member, joined):
    node = warpsocket.stats()["node_id"]
    warpsocket.send("events", json.dumps([channel, member, joined, node]))
"""
)


@pytest.fixture
def nodes(redis, write_worker):
    """``nodes(n) -> [Node, ...]``; ``nodes.client(node)``; all stopped at teardown."""
    pool = Nodes(write_worker(PRESENCE_WORKER, name="presence_worker.py"), redis.url)
    yield pool
    pool.stop()


class Events:
    """The changes broadcast on ``events``, as an observer client receives them."""

    def __init__(self, client, redis, nodes):
        self.client = client
        self.seen = []
        client.call("subscribe", "$me", "events")
        wait_listeners(redis, "events", nodes)

    def _pull(self, timeout):
        with contextlib.suppress(TimeoutError):
            while True:
                self.seen.append(tuple(json.loads(self.client.received(timeout=timeout))))
                timeout = 0.05

    def listen(self, seconds):
        """Collect what arrives for ``seconds`` (beats of every node go by meanwhile)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._pull(0.2)

    def wait(self, channel, member, joined, count=1, timeout=30):
        """Wait until ``(channel, member, joined)`` was reported ``count`` times; return the nodes."""

        def enough():
            self._pull(0.2)
            found = [e[3] for e in self.seen if e[:3] == (channel, member, joined)]
            return found if len(found) >= count else None

        return wait_for(enough, timeout=timeout, message=f"{(channel, member, joined)} x{count}")

    def settle(self, sentinel_from):
        """Everything reported before now has arrived: a sentinel sent after it comes last."""
        sentinel_from.call("send", "events", json.dumps(["sentinel", "", True, 0]))
        self.wait("sentinel", "", True, count=sum(1 for e in self.seen if e[0] == "sentinel") + 1)

    def of(self, channel):
        return [e[:3] for e in self.seen if e[0] == channel]


@pytest.mark.timeout(240)
def test_a_member_on_two_nodes_is_present_once(nodes, redis):
    a, b = nodes(2)
    on_a, on_b, tab2_on_b = nodes.client(a), nodes.client(b), nodes.client(b)
    events = Events(nodes.client(a), redis, 1)

    assert on_a.call("track", "$me", "room", "ada", "first") is True
    assert on_b.call("track", "$me", "room", "ada", "second") is False
    assert tab2_on_b.call("track", "$me", "room", "bob") is True
    for client in (on_a, on_b):
        assert client.call("presence_count", "room") == 2
        assert client.call("presence", "room") == {"ada": "second", "bob": None}
    assert on_a.call("stats")["presence_members"] == 1
    assert on_b.call("stats")["presence_members"] == 2
    with warpsocket.Cluster(redis.url) as cluster:
        assert cluster.presence_count("room") == 2
        assert cluster.presence("room") == {"ada": "second", "bob": None}
        assert cluster.presence_count("nobody here") == 0
        assert cluster.presence("nobody here") == {}

    # Ada's socket on A goes: she is still present through B.
    assert on_a.call("untrack", "$me", "room") is False
    assert on_a.call("untrack", "$me", "room") is False
    assert on_b.call("presence_count", "room") == 2
    # Her last socket closes: she leaves, reported once, by B (whose socket it was).
    on_b.close()
    assert events.wait("room", "ada", False) == [b.node_id]
    assert on_a.call("presence", "room") == {"bob": None}
    events.settle(on_a)
    assert events.of("room") == [("room", "ada", True), ("room", "bob", True), ("room", "ada", False)]
    # Joined and reported on the node of the socket that made the change.
    assert events.wait("room", "bob", True) == [b.node_id]


@pytest.mark.timeout(120)
def test_another_nodes_socket_cannot_be_tracked_here(nodes, redis):
    a, b = nodes(2)
    on_a, on_b = nodes.client(a), nodes.client(b)
    reply = on_a.reply("track", on_b.id, "room", "ada")
    assert reply["error"] == "ValueError"
    assert on_a.call("presence_count", "room") == 0
    # Binary info, and info replaced by the latest track on any node.
    assert on_b.call("track", "$me", "room", "ada", "x") is True
    assert on_a.call("presence", "room") == {"ada": "x"}
    assert on_a.call("track", "$me", "room", "ada") is False
    assert on_b.call("presence", "room") == {"ada": None}


@pytest.mark.timeout(240)
def test_a_killed_nodes_members_leave_within_15_seconds_reported_once(nodes, redis):
    a, b, c = nodes(3)
    on_a, on_b, on_c = nodes.client(a), nodes.client(b), nodes.client(c)
    events = Events(nodes.client(a), redis, 1)
    assert on_c.call("track", "$me", "room", "carol") is True
    assert on_c.call("track", "$me", "lobby", "carol") is True
    assert on_c.call("track", "$me", "both", "ada") is True
    assert on_a.call("track", "$me", "both", "ada") is False
    assert on_b.call("track", "$me", "room", "bob") is True
    assert on_a.call("presence_count", "room") == 2

    c.kill()
    nodes_reporting = events.wait("room", "carol", False, timeout=15 + 5)
    assert events.wait("lobby", "carol", False) == nodes_reporting
    assert nodes_reporting[0] in (a.node_id, b.node_id)
    assert on_a.call("presence", "room") == {"bob": None}
    assert on_b.call("presence", "both") == {"ada": None}
    assert on_b.call("presence_count", "lobby") == 0
    # Reported once: a few beats later there is still one leave each, and no ada leave.
    events.settle(on_b)
    events.listen(5)
    assert collections.Counter(events.seen)[("room", "carol", False, nodes_reporting[0])] == 1
    assert events.of("lobby").count(("lobby", "carol", False)) == 1
    assert ("both", "ada", False) not in events.of("both")


@pytest.mark.timeout(300)
def test_presence_comes_back_after_redis_lost_its_data(nodes, redis):
    a, b = nodes(2)
    on_a, on_b = nodes.client(a), nodes.client(b)
    assert on_a.call("track", "$me", "room", "ada") is True
    assert on_b.call("track", "$me", "room", "bob") is True

    redis.kill()
    wait_for(lambda: on_a.reply("presence_count", "room").get("error") == "ConnectionError", timeout=30)
    # While Redis is away a track changes this node's part only.
    assert on_a.call("untrack", "$me", "room") is False
    assert on_a.call("stats")["presence_members"] == 0
    redis.start()
    # Every node tells the new, empty Redis what it holds.
    wait_for(
        lambda: on_a.reply("presence", "room").get("result") == {"bob": None},
        timeout=30,
        message="bob back in Redis, ada gone",
    )
    assert on_b.call("presence_count", "room") == 1


@pytest.mark.timeout(300)
def test_churn_across_two_nodes_reports_every_change_once_and_ends_empty(nodes, redis):
    a, b = nodes(2)
    events = Events(nodes.client(a), redis, 1)
    sockets = [nodes.client(a) for _ in range(4)] + [nodes.client(b) for _ in range(4)]
    rng = random.Random(7)
    tracked = {}
    expected_present = collections.Counter()
    for _ in range(300):
        client = rng.choice(sockets)
        channel = rng.choice(["r1", "r2"])
        key = (client.id, channel)
        if key in tracked and rng.random() < 0.5:
            member = tracked.pop(key)
            client.call("untrack", "$me", channel)
            expected_present[(channel, member)] -= 1
        else:
            member = rng.choice(["ada", "bob", "cy"])
            if key in tracked:
                expected_present[(channel, tracked[key])] -= 1
            tracked[key] = member
            client.call("track", "$me", channel, member)
            expected_present[(channel, member)] += 1
    for channel in ("r1", "r2"):
        truth = {m for (c, m), n in expected_present.items() if c == channel and n > 0}
        assert sockets[0].call("presence_count", channel) == len(truth)
        assert set(sockets[-1].call("presence", channel)) == truth
    for client in sockets:
        client.close()
    for channel in ("r1", "r2"):
        wait_for(
            lambda channel=channel: events.client.call("presence_count", channel) == 0,
            timeout=30,
            message=f"{channel} empty",
        )
    events.settle(events.client)
    # Per (channel, member): joins and leaves alternate in Redis's order, each once.
    balance = collections.Counter()
    for channel, member, joined in events.of("r1") + events.of("r2"):
        balance[(channel, member)] += 1 if joined else -1
    assert all(n == 0 for n in balance.values()), balance
    assert sum(1 for e in events.seen if e[0] in ("r1", "r2") and e[2]) >= 3
