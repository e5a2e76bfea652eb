"""Cluster mode (docs/api.md#cluster): several WarpSocket processes sharing one real Redis server.

Each node is a ``python -m warpsocket`` process with a control worker: a client sends
``{"tag": n, "fn": name, "args": [...]}`` and the handler calls ``warpsocket.<name>``
(``"$me"`` stands for the caller's socket id) and replies ``{"tag": n, "result": ...}``.
Anything else a client receives is a message some node sent to it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import warpsocket
from helpers import (
    ServerProcess,
    connect,
    free_port,
    wait_for,
    wait_no_warpsocket_threads,
    warpsocket_command,
)
from websockets.exceptions import ConnectionClosed

CONTROL_WORKER = r'''
import json
import warpsocket


def _resolve(value, me):
    if value == "$me":
        return me
    if isinstance(value, list):
        return [_resolve(v, me) for v in value]
    return value


def _increment(key, times):
    """Add 1 to an integer kept under ``key`` ``times`` times by compare-and-set."""
    retries = 0
    for _ in range(times):
        while True:
            old = warpsocket.get_key(key)
            if warpsocket.set_key_if(key, str(int(old or b"0") + 1), old):
                break
            retries += 1
    return retries


def handle_text_message(text, socket_id):
    request = json.loads(text)
    reply = {"tag": request["tag"]}
    try:
        args = _resolve(request.get("args", []), socket_id)
        if request["fn"] == "me":
            result = socket_id
        elif request["fn"] == "increment":
            result = _increment(*args)
        else:
            result = getattr(warpsocket, request["fn"])(*args)
        if isinstance(result, bytes):
            result = result.decode()
        reply["result"] = result
    except Exception as exc:
        reply["error"] = type(exc).__name__
        reply["message"] = str(exc)
    warpsocket.send(socket_id, json.dumps(reply))
'''


# --------------------------------------------------------------------------
# Redis and node processes
# --------------------------------------------------------------------------


class Node(ServerProcess):
    """One ``python -m warpsocket`` process in the cluster."""

    def __init__(self, worker, url, *options):
        options = ("--cluster", url, "--threads", "2", "--hang-timeout", "60", *options)
        super().__init__(warpsocket_command(worker, "--bind", "127.0.0.1:0", *options))
        found = wait_for(self._started, timeout=60, message="node to listen")
        self.node_id, self.port = found

    def _started(self):
        text = self.output()
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}:\n{text}")
        node = re.search(r"as node (\d+)", text)
        port = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
        return node and port and (int(node.group(1)), int(port.group(1)))


class Client:
    """A ``websockets`` client that drives a node's control worker."""

    _tags = itertools.count(1)

    def __init__(self, node):
        # Unbounded: a client that stops reading still sees the close frame behind
        # what it left unread, so closing it does not wait for close_timeout.
        self.ws = connect(f"ws://127.0.0.1:{node.port}/", max_queue=None)
        self.replies = {}
        self.inbox = queue.Queue()
        self.id = self.call("me")

    def _receive(self, timeout):
        message = self.ws.recv(timeout=timeout)
        if isinstance(message, str) and message.startswith('{"tag"'):
            reply = json.loads(message)
            self.replies[reply["tag"]] = reply
        else:
            self.inbox.put(message)

    def reply(self, fn, *args, timeout=60):
        tag = next(self._tags)
        self.ws.send(json.dumps({"tag": tag, "fn": fn, "args": list(args)}))
        deadline = time.monotonic() + timeout
        while tag not in self.replies:
            self._receive(max(0.01, deadline - time.monotonic()))
        return self.replies.pop(tag)

    def call(self, fn, *args, timeout=60):
        reply = self.reply(fn, *args, timeout=timeout)
        assert "error" not in reply, f"{fn}{args} raised {reply['error']}: {reply['message']}"
        return reply["result"]

    def received(self, timeout=20):
        """The next message some node sent to this client."""
        deadline = time.monotonic() + timeout
        while self.inbox.empty():
            self._receive(max(0.01, deadline - time.monotonic()))
        return self.inbox.get_nowait()

    def close(self):
        self.ws.close()


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


class Nodes:
    """The node processes and clients of one test: ``nodes(count, *options) -> [Node, ...]``,
    ``nodes.client(node) -> Client``; :meth:`stop` ends them all (a fixture's teardown)."""

    def __init__(self, worker, url):
        self.worker, self.url = worker, url
        self.started, self.clients = [], []

    def __call__(self, count, *options):
        new = [Node(self.worker, self.url, *options) for _ in range(count)]
        self.started.extend(new)
        return new

    def client(self, node):
        self.clients.append(Client(node))
        return self.clients[-1]

    def stop(self):
        for client in self.clients:
            with contextlib.suppress(Exception):
                client.close()
        for node in self.started:
            node.stop()


@pytest.fixture
def cluster(redis, write_worker):
    """``cluster(n) -> [Node, ...]``: n nodes on ``redis``; every node and client stops at teardown."""
    nodes = Nodes(write_worker(CONTROL_WORKER, name="control_worker.py"), redis.url)
    yield nodes
    nodes.stop()


def wait_listeners(redis, channel, count):
    wait_for(
        lambda: redis.listeners(channel) == count,
        timeout=30,
        message=f"{count} nodes listening on {channel!r}",
    )


def assert_nothing_more(client, sentinel_from, sentinel):
    """Everything queued for ``client`` before ``sentinel`` has arrived; nothing else did."""
    sentinel_from.call("send", client.id, sentinel)
    assert client.received() == sentinel


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_nodes_get_distinct_numbers_in_their_socket_ids(cluster):
    nodes = cluster(3)
    assert len({n.node_id for n in nodes}) == 3
    for node in nodes:
        client = cluster.client(node)
        assert client.id >> 40 == node.node_id
        assert client.call("stats")["node_id"] == node.node_id


@pytest.mark.timeout(240)
def test_channel_broadcast_reaches_every_node_exactly_once(cluster, redis):
    a, b, c = cluster(3)
    sender, on_a, on_b, on_c = (cluster.client(n) for n in (a, a, b, c))
    for client in (on_a, on_b, on_c):
        assert client.call("subscribe", "$me", "room") == [client.id]
    wait_listeners(redis, "room", 3)

    # 1 local subscriber plus one message handed to Redis for the other nodes.
    assert sender.call("send", "room", "hello") == 2
    for client in (on_a, on_b, on_c):
        assert client.received() == "hello"
        assert_nothing_more(client, sender, "sentinel")
    assert sender.call("stats")["cluster_messages_out"] >= 1
    assert on_b.call("stats")["cluster_messages_in"] >= 1

    # Last subscriber out: that node stops listening on the channel.
    assert on_c.call("unsubscribe", "$me", "room") == [on_c.id]
    wait_listeners(redis, "room", 2)
    sender.call("send", "room", "again")
    assert on_b.received() == "again"
    assert_nothing_more(on_c, sender, "sentinel 2")


@pytest.mark.timeout(240)
def test_send_and_virtual_sockets_across_nodes(cluster, redis):
    a, b = cluster(2)
    on_a, on_b = cluster.client(a), cluster.client(b)

    assert on_a.call("send", on_b.id, "direct") == 1
    assert on_b.received() == "direct"
    assert on_a.call("send", [on_b.id, on_a.id], "both") == 2
    assert on_b.received() == "both"
    assert on_a.received() == "both"

    # A virtual socket for a remote socket is made by the owner and carries its node.
    virtual = on_a.call("create_virtual_socket", on_b.id, "v:")
    assert virtual >> 40 == b.node_id
    assert on_a.call("send", virtual, "hi") == 1
    assert on_b.received() == "v:hi"
    assert on_a.call("subscribe", virtual, "via-virtual") == []  # applied on node B
    wait_listeners(redis, "via-virtual", 1)
    assert on_a.call("has_subscriptions", "via-virtual") is True
    on_a.call("send", "via-virtual", "sub")
    assert on_b.received() == "v:sub"
    assert on_a.call("delete_virtual_socket", virtual) is True
    wait_listeners(redis, "via-virtual", 0)
    assert on_b.call("has_subscriptions", "via-virtual") is False
    on_a.call("send", virtual, "gone")
    assert_nothing_more(on_b, on_a, "sentinel")

    reply = on_a.reply("create_virtual_socket", (b.node_id << 40) + 999_999)
    assert reply["error"] == "ValueError"

    # close() on a remote socket is forwarded with its code.
    assert on_a.call("close", on_b.id, 4000, "bye") is True
    with pytest.raises(ConnectionClosed):
        on_b.ws.recv(timeout=30)
    assert on_b.ws.close_code == 4000
    assert on_b.ws.close_reason == "bye"


@pytest.mark.timeout(240)
def test_channel_to_channel_subscribe_across_nodes(cluster, redis):
    a, b, c = cluster(3)
    on_a, on_b, on_c = (cluster.client(n) for n in (a, b, c))
    for client in (on_a, on_b, on_c):
        client.call("subscribe", "$me", "team")
    on_c.call("subscribe", "$me", "company")  # then counted twice, still one entry
    wait_listeners(redis, "team", 3)

    # Every node adds its own subscribers of "team" to "company".
    on_a.call("subscribe", "team", "company")
    wait_for(lambda: redis.listeners("company") == 3, timeout=30, message="company everywhere")
    on_b.call("send", "company", "all hands")
    for client in (on_a, on_b, on_c):
        assert client.received() == "all hands"
        assert_nothing_more(client, on_b, "sentinel")

    # Reference counts hold across nodes: C's own subscription outlives the team's.
    on_a.call("unsubscribe", "team", "company")
    wait_listeners(redis, "company", 1)
    on_a.call("send", "company", "c only")
    assert on_c.received() == "c only"
    for client in (on_a, on_b, on_c):
        assert_nothing_more(client, on_a, "sentinel 2")


@pytest.mark.timeout(240)
def test_has_subscriptions_is_cluster_wide(cluster, redis):
    a, b = cluster(2)
    on_a, on_b = cluster.client(a), cluster.client(b)
    assert on_a.call("has_subscriptions", "lonely") is False
    on_b.call("subscribe", "$me", "lonely")
    wait_listeners(redis, "lonely", 1)
    assert on_a.call("has_subscriptions", "lonely") is True
    on_b.close()
    wait_for(
        lambda: on_a.call("has_subscriptions", "lonely") is False,
        timeout=30,
        message="has_subscriptions to turn False after the subscriber left",
    )
    assert redis.listeners("lonely") == 0


@pytest.mark.timeout(300)
def test_kv_compare_and_set_from_every_node_stays_consistent(cluster):
    nodes = cluster(3)
    clients = [cluster.client(node) for node in nodes]
    assert clients[0].call("set_key", "shared", "x") is None
    assert clients[1].call("get_key", "shared") == "x"
    assert clients[2].call("set_key_if", "shared", "y", "x") is True
    assert clients[0].call("set_key_if", "shared", "z", "x") is False
    assert clients[1].call("set_key", "shared") == "y"  # deletes
    assert clients[2].call("get_key", "shared") is None

    results = []
    threads = [
        threading.Thread(target=lambda c=c: results.append(c.call("increment", "counter", 1000, timeout=240)))
        for c in clients
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(250)
    assert len(results) == 3
    assert clients[0].call("get_key", "counter") == "3000"
    assert all(c.call("stats")["keys"] == 1 for c in clients)


@pytest.mark.timeout(300)
def test_redis_restart_local_traffic_continues_and_broadcasts_resume(cluster, redis):
    a, b = cluster(2)
    sender, local, remote = cluster.client(a), cluster.client(a), cluster.client(b)
    for client in (local, remote):
        client.call("subscribe", "$me", "news")
    remote.call("subscribe", "$me", "remote only")
    wait_listeners(redis, "news", 2)
    wait_listeners(redis, "remote only", 1)
    assert sender.call("has_subscriptions", "remote only") is True
    assert sender.call("send", "news", "before") == 2
    assert local.received() == "before"
    assert remote.received() == "before"

    redis.kill()
    # Local delivery goes on; the cross-node part fails visibly.
    wait_for(
        lambda: sender.call("send", "news", "during") == 1,
        timeout=30,
        message="the node to notice Redis is gone",
    )
    failures = sender.call("stats")["cluster_send_failures"]
    assert failures >= 1
    assert sender.call("send", remote.id, "direct while down") == 0
    assert sender.call("stats")["cluster_send_failures"] > failures
    assert sender.call("stats")["keys"] == -1
    assert sender.reply("get_key", "k")["error"] == "ConnectionError"
    assert sender.reply("set_key_if", "k", "v")["error"] == "ConnectionError"
    assert sender.call("has_subscriptions", "news") is True  # this node's own answer
    assert sender.call("has_subscriptions", "remote only") is False
    assert sender.call("send", local.id, "local while down") == 1
    while (message := local.received()) != "local while down":
        assert message == "during"

    redis.start()
    # Both nodes reconnect and listen on "news" again, without being restarted.
    wait_listeners(redis, "news", 2)
    # Redis shows the subscriptions before the node has finished reconnecting
    # (it then fixes the node counter): publishing starts once it has, which
    # has_subscriptions of a channel only the other node listens on shows.
    wait_for(
        lambda: sender.call("has_subscriptions", "remote only") is True,
        timeout=30,
        message="the sending node to be connected to Redis again",
    )
    assert sender.call("send", "news", "after") == 2
    assert remote.received() == "after"
    while (message := local.received()) != "after":
        assert message == "during"
    assert sender.call("set_key", "k", "v") is None
    # The other node's command connection may still be in its reconnect backoff.
    wait_for(
        lambda: remote.reply("get_key", "k").get("result") == "v",
        timeout=30,
        message="the other node's kv to reach Redis again",
    )
    wait_for(lambda: "reconnected to Redis" in a.output(), message="the reconnect warning")


@pytest.mark.timeout(240)
def test_a_killed_node_leaves_the_others_serving(cluster, redis):
    a, b, c = cluster(3)
    on_a, on_b, on_c = (cluster.client(n) for n in (a, b, c))
    for client in (on_a, on_b, on_c):
        client.call("subscribe", "$me", "room")
    wait_listeners(redis, "room", 3)

    c.kill()
    wait_listeners(redis, "room", 2)
    assert on_a.call("send", "room", "still here") == 2
    assert on_a.received() == "still here"
    assert on_b.received() == "still here"
    assert on_b.call("send", on_a.id, "direct") == 1
    assert on_a.received() == "direct"
    # A client of the dead node reconnects to a live one and gets a fresh id there.
    moved = cluster.client(b)
    assert moved.id >> 40 == b.node_id
    moved.call("subscribe", "$me", "room")
    on_a.call("send", "room", "welcome back")
    assert moved.received() == "welcome back"


# --------------------------------------------------------------------------
# in-process: start(cluster=...) arguments and failures
# --------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cluster_argument_is_checked(write_worker):
    worker = write_worker(CONTROL_WORKER, name="control_worker.py")
    with pytest.raises(TypeError, match="cluster"):
        warpsocket.start("127.0.0.1:0", worker, cluster=123)
    with pytest.raises(ValueError, match="cluster"):
        warpsocket.start("127.0.0.1:0", worker, cluster="http://127.0.0.1:6379")
    assert warpsocket.stats()["node_id"] == 0


@pytest.mark.timeout(180)
def test_kv_calls_racing_leave_never_panic(redis, write_worker):
    """stop() leaves the cluster while another thread waits on Redis: that call fails
    with ConnectionError (or goes to the local store), never with a panic."""
    worker = write_worker("def handle_text_message(text, socket_id):\n    pass\n")
    failures = []
    calls = [0]
    halt = threading.Event()

    def hammer():
        i = 0
        while not halt.is_set():
            i += 1
            try:
                warpsocket.set_key("race", str(i))
                warpsocket.get_key("race")
                warpsocket.set_key_if("race", "x", str(i))
                calls[0] += 1
            except ConnectionError:
                pass
            except BaseException as exc:  # a PanicException is a BaseException
                failures.append(exc)
                return

    def ask_a_missing_node():
        # Waits (up to Redis's timeout) for an answer that never comes: stop() always
        # finds this call blocked on the cluster's runtime.
        missing = (8000 << 40) | 1
        while not halt.is_set():
            try:
                warpsocket.create_virtual_socket(missing)
            except (ConnectionError, ValueError):
                pass
            except BaseException as exc:
                failures.append(exc)
                return

    threads = [threading.Thread(target=f, daemon=True) for f in (hammer, ask_a_missing_node)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(12):
            server = warpsocket.start(worker=str(worker), bind="127.0.0.1:0", threads=1, cluster=redis.url)
            wait_for(lambda before=calls[0]: calls[0] > before + 3 or failures, message="kv calls via Redis")
            server.stop(timeout=1.0)
            if failures:
                break
    finally:
        halt.set()
        for thread in threads:
            thread.join(timeout=30)
        warpsocket.set_key("race")
    assert not failures, repr(failures[0])
    assert not any(thread.is_alive() for thread in threads)
    wait_no_warpsocket_threads()


@pytest.mark.timeout(60)
def test_unreachable_redis_fails_start_and_leaves_nothing_running(write_worker):
    worker = write_worker(CONTROL_WORKER, name="control_worker.py")
    port = free_port()
    with pytest.raises(ConnectionError, match="Redis"):
        warpsocket.start("127.0.0.1:0", worker, cluster=f"redis://127.0.0.1:{port}/0")
    assert warpsocket.stats()["node_id"] == 0
    wait_no_warpsocket_threads()
    # The process is not stuck half-joined: a plain server starts and uses the local kv.
    with warpsocket.start("127.0.0.1:0", worker, threads=1):
        warpsocket.set_key("local", "yes")
        assert warpsocket.get_key("local") == b"yes"
        warpsocket.set_key("local")


class MuteSubscriber:
    """A fake Redis server that answers commands (INCR gives node 1) but never a SUBSCRIBE.

    A node can connect and take a number, but never starts listening.
    """

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        self.subscribes = 0
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        reader = conn.makefile("rb")
        try:
            while True:
                command = self._read_command(reader)
                if command is None:
                    return
                name = command[0].upper() if command else b""
                if name == b"SUBSCRIBE":
                    self.subscribes += 1
                elif name == b"INCR":
                    conn.sendall(b":1\r\n")
                elif name == b"PING":
                    conn.sendall(b"+PONG\r\n")
                else:
                    conn.sendall(b"+OK\r\n")
        except OSError:
            return

    @staticmethod
    def _read_command(reader):
        """One RESP array of bulk strings, as clients send commands; None at the end."""
        header = reader.readline()
        if not header.startswith(b"*"):
            return None
        args = []
        for _ in range(int(header[1:])):
            length = int(reader.readline()[1:])
            args.append(reader.read(length + 2)[:-2])
        return args

    def close(self):
        self.listener.close()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.close()


@pytest.mark.timeout(60)
def test_a_node_that_cannot_subscribe_fails_start_in_bounded_time(write_worker):
    """Serving before the node listens would lose messages: the join fails instead."""
    worker = write_worker(CONTROL_WORKER, name="control_worker.py")
    fake = MuteSubscriber()
    try:
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="pub/sub subscriptions"):
            warpsocket.start("127.0.0.1:0", worker, cluster=fake.url)
        assert time.monotonic() - started < 15
        assert fake.subscribes >= 1
    finally:
        fake.close()
    assert warpsocket.stats()["node_id"] == 0
    wait_no_warpsocket_threads()


@pytest.mark.timeout(240)
def test_performance_worker_buckets_span_nodes(redis):
    """The benchmark's worker with shared buckets: a channel of 10 holds clients of both nodes."""
    worker = Path(__file__).resolve().parent.parent / "examples" / "performance" / "worker.py"
    nodes = [Node(worker, redis.url, "--worker-arg", '{"buckets": "shared"}') for _ in range(2)]
    clients = []
    try:
        for i in range(20):
            ws = connect(f"ws://127.0.0.1:{nodes[i % 2].port}/")
            clients.append(ws)
            ws.send('{"type":"sub"}')
            assert json.loads(ws.recv(timeout=30)) == {"type": "sub-ack", "ch": f"shared-{i // 10}"}
        wait_listeners(redis, "shared-1", 2)
        clients[13].send('{"type":"req","channel":"shared-1"}')
        event = {"type": "evt", "t": "This is a message to my dear clients"}
        for ws in clients[10:]:
            assert json.loads(ws.recv(timeout=30)) == event
        assert json.loads(clients[13].recv(timeout=30)) == {"type": "ack"}
        for ws in clients[:10]:
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.5)
    finally:
        for ws in clients:
            ws.close()
        for node in nodes:
            node.stop()
