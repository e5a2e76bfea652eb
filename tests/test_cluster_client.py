"""``warpsocket.Cluster`` (docs/api.md#cluster-client): the test process, which never calls
``start()``, talks to a cluster's sockets and channels through a real redis-server.

The node is a ``python -m warpsocket`` process with the control worker of test_cluster.py,
started with ``--history 'room:=100/300'``; its clients are ``websockets`` clients.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import warpsocket
from helpers import free_port, wait_for, wait_no_warpsocket_threads
from test_cluster import CONTROL_WORKER, Nodes, assert_nothing_more, wait_listeners
from test_cluster_history import stamped, wait_history_listeners
from websockets.exceptions import ConnectionClosed

HISTORY = {"room:": warpsocket.History(100, 300)}


def client_threads():
    """The names of this process's native threads that a ``Cluster`` runs (``warpsocket-client``)."""
    names = []
    for comm in Path(f"/proc/{os.getpid()}/task").glob("*/comm"):
        with contextlib.suppress(OSError):
            names.append(comm.read_text().strip())
    # The kernel keeps 15 characters of a thread's name.
    return [name for name in names if name.startswith("warpsocket-cli")]


@pytest.fixture
def node(redis, write_worker):
    """``node() -> Node`` on ``redis`` with history on ``room:``; nodes and clients stop at teardown."""
    pool = Nodes(write_worker(CONTROL_WORKER, name="control_worker.py"), redis.url)

    def _start():
        (started,) = pool(1, "--history", "room:=100/300")
        return started

    _start.client = pool.client
    yield _start
    pool.stop()


@pytest.fixture
def cluster(redis):
    """A ``warpsocket.Cluster`` on ``redis`` with the nodes' history; disconnected at teardown."""
    client = warpsocket.Cluster(redis.url, history=HISTORY)
    yield client
    client.disconnect()
    wait_for(lambda: not client_threads(), timeout=10, message="the Cluster's thread to end")


@pytest.mark.timeout(180)
def test_channel_sends_reach_the_nodes_clients_once(node, cluster, redis):
    n = node()
    a, b = node.client(n), node.client(n)
    a.call("subscribe", "$me", "news")
    wait_listeners(redis, "news", 1)
    assert cluster.send("news", "hello") == 1
    assert cluster.send("news", b"\x00binary") == 1
    assert a.received() == "hello"
    assert a.received() == b"\x00binary"
    assert cluster.has_subscriptions("news")
    assert not cluster.has_subscriptions("nobody")
    assert_nothing_more(a, b, "sentinel")
    assert_nothing_more(b, a, "sentinel")


@pytest.mark.timeout(180)
def test_history_channel_sends_are_sequenced_as_a_nodes(node, cluster, redis):
    n = node()
    a, sender = node.client(n), node.client(n)
    a.call("subscribe", "$me", "room:1")
    wait_history_listeners(redis, "room:1", 1)
    assert cluster.has_subscriptions("room:1")
    sender.call("send", "room:1", "from the node")
    assert stamped(a.received()) == (1, "from the node")
    assert cluster.send("room:1", "from the cluster") == 1
    assert stamped(a.received()) == (2, "from the cluster")
    sender.call("send", "room:1", "node again")
    assert stamped(a.received()) == (3, "node again")
    epoch, offset = sender.call("position", "room:1")
    assert cluster.position("room:1") == (epoch, offset) == (epoch, 3)
    kept = [(1, "from the node"), (2, "from the cluster"), (3, "node again")]
    assert cluster.history("room:1") == kept
    assert [tuple(m) for m in sender.call("history", "room:1")] == kept
    assert cluster.history("room:1", since=1, limit=1) == [(2, "from the cluster")]
    assert_nothing_more(a, sender, "sentinel")


@pytest.mark.timeout(180)
def test_sends_and_closes_to_socket_ids_go_to_their_node(node, cluster):
    n = node()
    a, b = node.client(n), node.client(n)
    assert cluster.send(a.id, "to a") == 1
    assert cluster.send([a.id, b.id], "to both") == 2
    assert a.received() == "to a"
    assert a.received() == "to both"
    assert b.received() == "to both"
    # An id no node handed out has nowhere to go.
    assert cluster.send(5, "nowhere") == 0
    assert not cluster.close(5)
    assert_nothing_more(a, b, "sentinel")
    assert cluster.close(a.id, 4000, "bye")
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            a.ws.recv(timeout=20)
    assert closed.value.rcvd.code == 4000
    assert closed.value.rcvd.reason == "bye"
    wait_for(lambda: b.call("stats")["connections"] == 1, timeout=20, message="the close on the node")


@pytest.mark.timeout(180)
def test_subscribe_forwards_sockets_and_channel_sources(node, cluster, redis):
    n = node()
    a, b = node.client(n), node.client(n)
    assert cluster.subscribe(a.id, "alerts") == []
    wait_listeners(redis, "alerts", 1)
    assert cluster.send("alerts", "one") == 1
    assert a.received() == "one"

    # Everyone subscribed to "alerts" gets "digest" too.
    assert cluster.subscribe("alerts", "digest") == []
    wait_listeners(redis, "digest", 1)
    assert cluster.send("digest", "two") == 1
    assert a.received() == "two"

    assert cluster.unsubscribe("alerts", "digest") == []
    wait_listeners(redis, "digest", 0)
    assert cluster.unsubscribe([a.id], "alerts", 1) == []
    wait_listeners(redis, "alerts", 0)
    assert not cluster.has_subscriptions("alerts")
    assert cluster.send("alerts", "not delivered") == 1
    assert_nothing_more(a, b, "sentinel")


@pytest.mark.timeout(180)
def test_the_kv_store_is_the_nodes(node, cluster):
    n = node()
    a = node.client(n)
    assert cluster.set_key("from-cluster", "1") is None
    assert a.call("get_key", "from-cluster") == "1"
    a.call("set_key", "from-node", "2")
    assert cluster.get_key("from-node") == b"2"
    assert cluster.set_key("from-node", b"3") == b"2"
    assert a.call("get_key", "from-node") == "3"
    assert not cluster.set_key_if("from-node", "4", "wrong")
    assert cluster.set_key_if("from-node", "4", "3")
    assert a.call("set_key_if", "from-node", "5", "4")
    assert cluster.get_key("from-node") == b"5"
    assert cluster.set_key_if("fresh", "x", None)
    assert not cluster.set_key_if("fresh", "y", None)
    assert cluster.set_key("fresh") == b"x"
    assert a.call("get_key", "fresh") is None


@pytest.mark.timeout(240)
def test_eight_threads_share_one_cluster_and_every_message_arrives_once(node, cluster, redis):
    n = node()
    a, b = node.client(n), node.client(n)
    a.call("subscribe", "$me", "load")
    wait_listeners(redis, "load", 1)
    threads, per_thread = 8, 250
    handed = [0] * threads

    def sender(index):
        for i in range(per_thread):
            handed[index] += cluster.send("load", f"{index}:{i}")

    workers = [threading.Thread(target=sender, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert handed == [per_thread] * threads
    received = [a.received() for _ in range(threads * per_thread)]
    assert sorted(received) == sorted(f"{t}:{i}" for t in range(threads) for i in range(per_thread))
    # Each thread's messages stay in its order.
    for t in range(threads):
        mine = [int(m.split(":")[1]) for m in received if m.startswith(f"{t}:")]
        assert mine == list(range(per_thread))
    assert_nothing_more(a, b, "sentinel")


@pytest.mark.timeout(60)
def test_bad_arguments_name_the_argument(redis, cluster):
    with pytest.raises(TypeError, match="url"):
        warpsocket.Cluster(6379)
    with pytest.raises(ValueError):
        warpsocket.Cluster("not a redis url")
    with pytest.raises(ValueError, match="size"):
        warpsocket.Cluster(redis.url, history={"room:": warpsocket.History(0)})
    with pytest.raises(TypeError, match="history"):
        warpsocket.Cluster(redis.url, history=["room:"])
    with pytest.raises(TypeError, match="target"):
        cluster.send(1.5, "x")
    with pytest.raises(TypeError, match="data"):
        cluster.send("news", 5)
    with pytest.raises(ValueError, match="socket_id"):
        cluster.close(-1)
    with pytest.raises(ValueError, match="code"):
        cluster.close(1 << 40 | 1, 1)
    with pytest.raises(TypeError, match="channel"):
        cluster.subscribe(1 << 40 | 1, 5)
    with pytest.raises(TypeError, match="key"):
        cluster.get_key(None)
    with pytest.raises(ValueError, match="since"):
        cluster.history("room:1", since=-1)
    with pytest.raises(ValueError, match="keeps no history"):
        cluster.position("plain")
    with pytest.raises(TypeError, match="channel"):
        cluster.presence(7)
    with pytest.raises(TypeError, match="channel"):
        cluster.presence_count(None)


@pytest.mark.timeout(120)
def test_unreachable_redis_raises_connection_error(redis):
    began = time.monotonic()
    with pytest.raises(ConnectionError):
        warpsocket.Cluster(f"redis://127.0.0.1:{free_port()}/0")
    assert time.monotonic() - began < 5
    wait_for(lambda: not client_threads(), timeout=10, message="the failed Cluster's thread to end")

    with warpsocket.Cluster(redis.url, history=HISTORY) as cluster:
        assert cluster.send("news", "up") == 1
        redis.kill()
        wait_for(lambda: cluster.send("news", "down") == 0, timeout=20, message="sends to fail")
        for call in (
            lambda: cluster.get_key("k"),
            lambda: cluster.set_key("k", "v"),
            lambda: cluster.set_key_if("k", "v"),
            lambda: cluster.position("room:1"),
            lambda: cluster.history("room:1"),
            lambda: cluster.presence("room:1"),
            lambda: cluster.presence_count("room:1"),
        ):
            with pytest.raises(ConnectionError):
                call()
        assert not cluster.has_subscriptions("news")
        redis.start()
        wait_for(lambda: cluster.send("news", "up again") == 1, timeout=30, message="sends to work again")
        assert cluster.set_key("k", "v") is None
        assert cluster.get_key("k") == b"v"


@pytest.mark.timeout(60)
def test_disconnect_and_the_with_block_release_everything(redis):
    with warpsocket.Cluster(redis.url) as cluster:
        assert client_threads()
        assert not cluster.disconnected
        assert cluster.set_key("k", "v") is None
    assert cluster.disconnected
    wait_for(lambda: not client_threads(), timeout=10, message="the Cluster's thread to end")
    wait_no_warpsocket_threads()
    for call in (
        lambda: cluster.send("news", "x"),
        lambda: cluster.subscribe(1 << 40 | 1, "news"),
        lambda: cluster.close(1 << 40 | 1),
        lambda: cluster.get_key("k"),
        lambda: cluster.has_subscriptions("news"),
    ):
        with pytest.raises(RuntimeError, match="disconnected"):
            call()
    cluster.disconnect()  # twice is fine

    # Threads busy with Redis calls as it goes end with an error, none hangs.
    other = warpsocket.Cluster(redis.url)
    outcomes, calls = [], []

    def busy():
        try:
            while True:
                other.get_key("k")
                calls.append(1)
        except (RuntimeError, ConnectionError) as exc:
            outcomes.append(type(exc))

    busy_threads = [threading.Thread(target=busy) for _ in range(4)]
    for thread in busy_threads:
        thread.start()
    wait_for(lambda: len(calls) >= 20, timeout=20, message="the threads to call Redis")
    other.disconnect()
    for thread in busy_threads:
        thread.join(10)
    assert len(outcomes) == 4
    assert other.disconnected
    wait_for(lambda: not client_threads(), timeout=10, message="the Cluster's thread to end")


@pytest.mark.timeout(90)
def test_a_plain_script_sends_and_exits(redis, node):
    # The sends are only queued when send() returns: leaving the with block must
    # hand every one of them to Redis before the process exits.
    n = node()
    a = node.client(n)
    script = (
        "import sys, warpsocket\n"
        "with warpsocket.Cluster(sys.argv[1]) as cluster:\n"
        "    print(sum(cluster.send(int(sys.argv[2]), f'from a script {i}') for i in range(500)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, redis.url, str(a.id)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "500"
    assert [a.received() for _ in range(500)] == [f"from a script {i}" for i in range(500)]
