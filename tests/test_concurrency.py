"""Many Python threads calling subscribe / unsubscribe / send / set_key_if at once.

The functions are callable from any thread; under contention they must still end in
exactly the state a serial execution implies: reference counts balance out, every
"newly subscribed" report is matched by a "reached zero" report, compare-and-set never
loses an update, every queued message is delivered, and connections opening and closing
underneath do not leave subscriptions or virtual sockets behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import sys
import threading
import time
import uuid

import pytest
import warpsocket
from helpers import ask, async_connect_kwargs, connect, wait_for
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed

WORKER = """
import warpsocket

def handle_open(socket_id, ip, headers):
    if headers.get(":path", "/").startswith("/churn"):
        warpsocket.subscribe(socket_id, "churn-all")
        vid = warpsocket.create_virtual_socket(socket_id, "cv|")
        warpsocket.subscribe(vid, "churn-v")
        warpsocket.subscribe(vid, "churn-all")
    elif headers.get(":path", "/") == "/room":
        warpsocket.subscribe(socket_id, "room")
    return True

def handle_text_message(text, socket_id):
    if text == "id":
        warpsocket.send(socket_id, str(socket_id))
    elif text.startswith("b "):
        warpsocket.send("room", text[2:])
    else:
        warpsocket.send(socket_id, text)
"""

_tokens = itertools.count()


class DrainingClient:
    """A connected client whose messages are read by a background thread."""

    def __init__(self, server, path="/"):
        self.ws = connect(server, path)
        self.sid = int(ask(self.ws, "id", timeout=60))
        self.messages = []
        self.count = 0
        self.error = None
        self.token = f"~end~{next(_tokens)}~"
        self.thread = threading.Thread(target=self._run, name=f"drain-{self.sid}", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while True:
                message = self.ws.recv(timeout=120)
                if message == self.token:
                    return
                self.messages.append(message)
                self.count += 1
        except (ConnectionClosed, TimeoutError) as exc:
            self.error = exc

    def finish(self, timeout=60):
        """Send the end token straight to the socket and wait for the reader to stop."""
        assert warpsocket.send(self.sid, self.token) == 1
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "drain thread did not see the end token"
        assert self.error is None, f"reader failed: {self.error!r}"

    def close(self):
        with contextlib.suppress(Exception):
            self.ws.close()
        self.thread.join(30)


def run_threads(targets, timeout=120):
    errors = []

    def wrap(fn, i):
        def run():
            try:
                fn(i)
            except BaseException as exc:  # noqa: BLE001 - reported to the test thread
                errors.append(exc)

        return run

    threads = [
        threading.Thread(target=wrap(fn, i), name=f"stress-{i}", daemon=True) for i, fn in enumerate(targets)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running: {alive}"
    if errors:
        raise errors[0]


@pytest.mark.timeout(240)
def test_concurrent_mixed_operations_end_in_serial_state(start_server):
    server = start_server(WORKER, threads=2, ping_interval=600.0)
    closes_before = warpsocket.stats()["backpressure_closes"]  # process-wide counter
    n_threads = 8
    iterations = 8000
    counter_key = f"cc-counter-{uuid.uuid4().hex}"
    lock_key = f"cc-lock-{uuid.uuid4().hex}"
    clients = [DrainingClient(server) for _ in range(3)]
    try:
        # the ids the threads play with: 3 connections and 2 virtual sockets each
        prefixes = {}
        targets = []
        for ci, client in enumerate(clients):
            targets.append(client.sid)
            prefixes[client.sid] = ""
            for vi in range(2):
                prefix = f"v{ci}{vi}|"
                vid = warpsocket.create_virtual_socket(client.sid, prefix)
                prefixes[vid] = prefix
                targets.append(vid)
        channels = [f"cc{i}" for i in range(4)]
        # baseline subscriptions that must survive the storm untouched
        base_pairs = [(clients[0].sid, "cc0"), (targets[4], "cc1"), (clients[2].sid, "cc-quiet")]
        for t, ch in base_pairs:
            assert warpsocket.subscribe(t, ch) == [t]
        baseline = warpsocket.stats()
        assert baseline["subscriptions"] == 3
        assert warpsocket.set_key(counter_key, "0") is None

        results = [None] * n_threads

        def worker(tid):
            rng = random.Random(tid)
            ops = newly = zeroed = cas_ok = locks = sent = 0
            base_reported = []
            outstanding = []
            seq = 0
            for it in range(iterations):
                t = rng.choice(targets)
                ch = rng.choice(channels)
                d = rng.choice((1, 2))
                r = warpsocket.subscribe(t, ch, d)
                ops += 1
                assert r in ([], [t]), r
                newly += len(r)
                if (t, ch) in base_pairs and r:
                    base_reported.append(("sub", t, ch))
                outstanding.append((t, ch, d))
                # keep up to 3 subscriptions outstanding; drop them all at the end
                while len(outstanding) > 3 or (it == iterations - 1 and outstanding):
                    ut, uch, ud = outstanding.pop(0)
                    r = warpsocket.unsubscribe(ut, uch, ud)
                    ops += 1
                    assert r in ([], [ut]), r
                    zeroed += len(r)
                    if (ut, uch) in base_pairs and r:
                        base_reported.append(("unsub", ut, uch))
                if it % 4 == 0:
                    seq += 1
                    target = rng.choice(channels) if it % 8 == 0 else rng.choice(targets)
                    n = warpsocket.send(target, f"T{tid}.{seq}")
                    ops += 1
                    if isinstance(target, int):
                        assert n == 1
                    sent += n
                # compare-and-set counter
                old = warpsocket.get_key(counter_key)
                if warpsocket.set_key_if(counter_key, str(int(old) + 1), old):
                    cas_ok += 1
                ops += 2
                # a try-lock: only the holder can release it
                if it % 2 == 0:
                    ops += 1
                    if warpsocket.set_key_if(lock_key, str(tid), None):
                        locks += 1
                        ops += 1
                        assert warpsocket.get_key(lock_key) == str(tid).encode()
                        assert warpsocket.set_key_if(lock_key, None, str(tid)) is True
            assert not outstanding
            results[tid] = {
                "ops": ops,
                "newly": newly,
                "zeroed": zeroed,
                "cas_ok": cas_ok,
                "locks": locks,
                "sent": sent,
                "base_reported": base_reported,
            }

        started = time.monotonic()
        # switch threads far more often than the default 5 ms so that the calls interleave
        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        try:
            run_threads([worker] * n_threads, timeout=180)
        finally:
            sys.setswitchinterval(old_interval)
        elapsed = time.monotonic() - started

        total_ops = sum(r["ops"] for r in results)
        assert total_ops >= 100_000, total_ops
        for r in results:
            assert r["base_reported"] == []
        assert sum(r["newly"] for r in results) == sum(r["zeroed"] for r in results)
        assert sum(r["locks"] for r in results) > 0

        # the serial end state
        stats = warpsocket.stats()
        assert stats["subscriptions"] == baseline["subscriptions"]
        assert stats["channels"] == baseline["channels"]
        assert stats["virtual_sockets"] == baseline["virtual_sockets"] == 6
        assert stats["connections"] == 3
        for ch in channels[2:]:
            assert warpsocket.has_subscriptions(ch) is False
        assert warpsocket.has_subscriptions("cc0") is True
        assert warpsocket.has_subscriptions("cc1") is True
        for t, ch in base_pairs:  # each baseline pair still has count exactly 1
            assert warpsocket.unsubscribe(t, ch) == [t]
        assert warpsocket.stats()["subscriptions"] == 0
        cas_total = sum(r["cas_ok"] for r in results)
        assert warpsocket.get_key(counter_key) == str(cas_total).encode()
        assert warpsocket.get_key(lock_key) is None

        # every queued message is delivered, per sending thread in order
        total_sent = sum(r["sent"] for r in results)
        wait_for(
            lambda: sum(c.count for c in clients) >= total_sent,
            timeout=90,
            message=f"{total_sent} messages to arrive",
        )
        for client in clients:
            client.finish()
        assert sum(c.count for c in clients) == total_sent
        stats = warpsocket.stats()
        assert stats["messages_out"] - baseline["messages_out"] == total_sent + len(clients)
        assert stats["backpressure_closes"] == closes_before
        for client in clients:
            last = {}
            for message in client.messages:
                assert isinstance(message, str)
                prefix, _, body = message.rpartition("|")
                assert prefix == "" or prefix + "|" in prefixes.values(), message
                tid, seq = body[1:].split(".")
                tid, seq = int(tid), int(seq)
                assert seq >= last.get(tid, 0), f"out of order from thread {tid}: {message}"
                last[tid] = seq
        print(
            f"{total_ops} ops, {total_sent} messages, {cas_total} of {n_threads * iterations} CAS won, "
            f"{sum(r['newly'] for r in results)} new subscriptions in {elapsed:.1f}s"
        )
    finally:
        for client in clients:
            client.close()
        warpsocket.set_key(counter_key)


@pytest.mark.timeout(240)
def test_connections_churn_while_threads_subscribe_and_send(start_server):
    server = start_server(WORKER, threads=2, ping_interval=600.0)
    stay = [DrainingClient(server) for _ in range(2)]
    try:
        baseline = warpsocket.stats()
        assert baseline["connections"] == 2
        assert baseline["virtual_sockets"] == 0
        assert baseline["subscriptions"] == 0
        known = [c.sid for c in stay]
        known_lock = threading.Lock()
        churn_done = threading.Event()
        churn_rounds = 60
        sent_to_stay = [0]
        sent_lock = threading.Lock()

        def churner(i):
            for round_ in range(churn_rounds):
                # nobody reads the channel traffic these clients get: without max_queue=None
                # the client's own flow control stops reading and its close() stalls
                ws = connect(server, "/churn", max_queue=None)
                try:
                    ws.send("id")
                    # channel traffic may arrive before the answer
                    while not (reply := ws.recv(timeout=60)).isdigit():
                        pass
                    sid = int(reply)
                    with known_lock:
                        known.append(sid)
                    if round_ % 3 != 0:
                        # closed by the server, directly or through a virtual socket
                        if round_ % 3 == 1:
                            assert warpsocket.close(sid, 4000 + i) is True
                        else:
                            vid = warpsocket.create_virtual_socket(sid)
                            assert warpsocket.close(vid, 4000 + i) is True
                        with contextlib.suppress(ConnectionClosed, TimeoutError):
                            while True:
                                ws.recv(timeout=30)
                        assert ws.close_code == 4000 + i
                finally:
                    ws.close()

        def fiddler(i):
            rng = random.Random(100 + i)
            my_ch = f"fiddle-{i}"
            ops = 0
            while not churn_done.is_set() or ops < 2000:
                with known_lock:
                    sid = rng.choice(known)
                is_stay = sid in (stay[0].sid, stay[1].sid)
                r = warpsocket.subscribe(sid, my_ch)
                try:
                    vid = warpsocket.create_virtual_socket(sid, "f|")
                except ValueError:
                    assert not is_stay
                    vid = None
                if vid is not None:
                    warpsocket.subscribe(vid, "fiddle-shared")
                    warpsocket.subscribe(vid, my_ch, 2)
                n = warpsocket.send([my_ch, "churn-all"], "x")
                if is_stay:
                    assert r == [sid]
                    assert n >= 1 + (1 if vid is not None else 0)
                if rng.random() < 0.3:
                    n = warpsocket.send("churn-v", "y")
                if vid is not None:
                    warpsocket.unsubscribe(vid, "fiddle-shared")
                    deleted = warpsocket.delete_virtual_socket(vid, expected_target=sid)
                    if is_stay:
                        assert deleted is True
                    if rng.random() < 0.5:
                        assert warpsocket.delete_virtual_socket(vid) is False
                r = warpsocket.unsubscribe(sid, my_ch)
                if is_stay:
                    assert r == [sid]
                    with sent_lock:
                        sent_to_stay[0] += 1
                    assert warpsocket.send(sid, "direct") == 1
                ops += 1
                # let the connecting threads (and the clients' reader threads) have the GIL
                time.sleep(0.0005)
            fiddle_ops.append(ops)

        def churners_then_signal(i):
            try:
                churner(i)
            finally:
                # the last churner to finish lets the fiddlers stop
                with known_lock:
                    finished.append(i)
                    if len(finished) == 3:
                        churn_done.set()

        finished = []
        fiddle_ops = []
        started = time.monotonic()
        run_threads([churners_then_signal] * 3 + [fiddler] * 3, timeout=200)
        elapsed = time.monotonic() - started
        print(f"churn: {3 * churn_rounds} connections, {fiddle_ops} rounds in {elapsed:.1f}s")

        # everything that belonged to churned connections is gone
        def back_to_baseline():
            s = warpsocket.stats()
            return (
                s["connections"] == baseline["connections"]
                and s["virtual_sockets"] == baseline["virtual_sockets"]
                and s["subscriptions"] == baseline["subscriptions"]
                and s["channels"] == baseline["channels"]
            )

        try:
            wait_for(back_to_baseline, timeout=60, message="stats back to baseline")
        except AssertionError:
            s = warpsocket.stats()
            names = ("connections", "virtual_sockets", "subscriptions", "channels")
            now = {k: s[k] for k in names}
            raise AssertionError(f"stats not back to baseline: {now}") from None
        for ch in ["churn-all", "churn-v", "fiddle-shared"] + [f"fiddle-{i}" for i in range(3)]:
            assert warpsocket.has_subscriptions(ch) is False, ch
        assert len(known) == 2 + 3 * churn_rounds
        for client in stay:
            client.finish()
        assert sum(m == "direct" for c in stay for m in c.messages) == sent_to_stay[0]
    finally:
        for client in stay:
            client.close()


@pytest.mark.timeout(240)
def test_many_async_clients_broadcasting_through_handlers(start_server):
    """Handlers on both workers broadcast to one channel at the same time."""
    server = start_server(WORKER, threads=2, ping_interval=600.0)
    n_clients = 16
    per_client = 40
    url = f"ws://127.0.0.1:{server.port}/room"

    async def _wait_members(n):
        while warpsocket.stats()["subscriptions"] < n:
            await asyncio.sleep(0.02)

    async def main():
        conns = [await async_connect(url, **async_connect_kwargs()) for _ in range(n_clients)]
        try:
            await asyncio.wait_for(_wait_members(n_clients), 60)
            before = warpsocket.stats()

            async def talk(i, ws):
                for j in range(per_client):
                    await ws.send(f"b {i}.{j}")

            async def listen(ws):
                got = []
                while len(got) < n_clients * per_client:
                    got.append(await asyncio.wait_for(ws.recv(), 60))
                return got

            listeners = [asyncio.create_task(listen(ws)) for ws in conns]
            await asyncio.gather(*(talk(i, ws) for i, ws in enumerate(conns)))
            received = await asyncio.gather(*listeners)
            return before, received
        finally:
            for ws in conns:
                await ws.close()

    before, received = asyncio.run(main())
    for got in received:
        last = {}
        for message in got:
            sender, seq = (int(x) for x in message.split("."))
            # one sender's messages are broadcast by one handler thread: in order
            assert seq == last.get(sender, -1) + 1, f"{message} after {last.get(sender)}"
            last[sender] = seq
        assert last == {i: per_client - 1 for i in range(n_clients)}
    stats = warpsocket.stats()
    assert stats["messages_out"] - before["messages_out"] == n_clients * n_clients * per_client
    assert stats["messages_in"] - before["messages_in"] == n_clients * per_client
    wait_for(lambda: not warpsocket.has_subscriptions("room"), message="room empty")
    wait_for(lambda: warpsocket.stats()["connections"] == 0, message="all closed")
    assert warpsocket.stats()["subscriptions"] == 0
