"""The FastAPI notices example (examples/notify/app.py), end to end.

Real processes as examples/notify/README.md runs them: redis-server, the chat
(examples/chat/worker.py) as a ``python -m warpsocket`` cluster node with the chat's
``--history 'room:=50/86400'``, and the app under uvicorn. Notices are POSTed with
``urllib.request``; a ``websockets`` client that joined the room on the node speaks
the chat's protocol (the ``Chat`` of test_chat.py) and must get each one once, stamped
with its offset like any chat message.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import ServerProcess, wait_for
from test_chat import Chat
from test_cluster import Node
from test_cluster_history import wait_history_listeners

ROOT = Path(__file__).resolve().parent.parent
CHAT_WORKER = ROOT / "examples" / "chat" / "worker.py"
NOTIFY_DIR = ROOT / "examples" / "notify"
UVICORN_PORT = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


class Uvicorn(ServerProcess):
    """``uvicorn app:app --app-dir examples/notify`` on a port of its own choosing.

    The app reads the cluster's URL from ``WARPSOCKET_REDIS`` in the environment.
    """

    def __init__(self) -> None:
        """Start it and wait until it listens."""
        argv = [sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(NOTIFY_DIR)]
        argv += ["--host", "127.0.0.1", "--port", "0", "--log-level", "info"]
        super().__init__(argv, cwd=ROOT)
        self.port = wait_for(self._listening, timeout=60, message="uvicorn to listen")

    def _listening(self) -> int | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"uvicorn exited with {self.proc.returncode}:\n{self.output()}")
        found = UVICORN_PORT.search(self.output())
        return int(found.group(1)) if found else None

    def post(self, path: str, body: object) -> tuple[int, dict]:
        """POST ``body`` as JSON; ``(status, decoded JSON reply)``."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


@pytest.fixture
def notify(redis, monkeypatch):
    """``(node, app, chat)``: the chat node, the notices app and a factory of chat clients on the node.

    Every process and client stops at teardown; uvicorn must shut down cleanly (the
    app's lifespan disconnects its Cluster).
    """
    node = Node(CHAT_WORKER, redis.url, "--history", "room:=50/86400")
    processes: list[ServerProcess] = [node]
    clients: list[Chat] = []
    try:
        monkeypatch.setenv("WARPSOCKET_REDIS", redis.url)
        app = Uvicorn()
        processes.append(app)

        def chat(name: str) -> Chat:
            client = Chat(node)
            clients.append(client)
            client.hello(name)
            return client

        yield node, app, chat
        for client in clients:
            client.close()
        app.stop()
        # Recent uvicorn re-raises the SIGTERM once it has shut down gracefully.
        assert app.proc.returncode in (0, -signal.SIGTERM), app.output()
        assert "Application shutdown complete" in app.output()
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()
        for process in reversed(processes):
            process.stop()
            assert process.proc.poll() is not None


def notice_texts(messages: list[dict]) -> list[str]:
    return [m["text"] for m in messages if m["name"] == "notice"]


@pytest.mark.timeout(180)
def test_a_posted_notice_reaches_the_room_once_as_a_chat_message(notify, redis):
    node, app, chat = notify
    alice = chat("alice")
    alice.join_with_history("lobby")
    wait_history_listeners(redis, "room:lobby", 1)
    alice.send(type="say", room="lobby", text="hello")
    assert alice.expect("message", "lobby", text="hello")["id"] == 1

    status, reply = app.post("/rooms/lobby/notices", {"text": "maintenance at 18:00"})
    assert (status, reply) == (200, {"sent": 1})
    notice = alice.expect("message", "lobby", name="notice")
    # Stamped with the room's next offset, as the page expects of a chat message.
    assert notice["id"] == 2
    assert notice["text"] == "maintenance at 18:00"
    assert notice["from"] is None and isinstance(notice["ts"], int)

    # Kept with the room's messages: a member who joins later finds it in the history page.
    bob = chat("bob")
    _, page = bob.join_with_history("lobby")
    assert [(m["id"], m["name"], m["text"]) for m in page["messages"]] == [
        (1, "alice", "hello"),
        (2, "notice", "maintenance at 18:00"),
    ]

    # Once: the sentinel arrives next, with no second copy of the notice before it.
    alice.send(type="say", room="lobby", text="sentinel")
    assert [m["text"] for m in alice.messages_until("lobby", "sentinel")] == ["sentinel"]


@pytest.mark.timeout(180)
def test_bad_requests_send_nothing(notify, redis):
    _, app, chat = notify
    alice = chat("alice")
    alice.join_with_history("lobby")
    wait_history_listeners(redis, "room:lobby", 1)
    assert app.post("/rooms/not%20a%20room/notices", {"text": "x"})[0] == 404
    assert app.post("/rooms/thirteen-long/notices", {"text": "x"})[0] == 404
    assert app.post("/rooms/lobby/notices", {"text": ""})[0] == 422
    assert app.post("/rooms/lobby/notices", {"text": "x" * 2001})[0] == 422
    assert app.post("/rooms/lobby/notices", {})[0] == 422
    # Room names are case-insensitive, as in the chat.
    assert app.post("/rooms/Lobby/notices", {"text": "the first"}) == (200, {"sent": 1})
    first = alice.expect("message", "lobby")
    assert (first["id"], first["name"], first["text"]) == (1, "notice", "the first")


@pytest.mark.timeout(300)
def test_notices_posted_from_8_threads_each_arrive_once(notify, redis):
    _, app, chat = notify
    alice = chat("alice")
    alice.join_with_history("news")
    wait_history_listeners(redis, "room:news", 1)
    threads, per_thread = 8, 25
    failures: list[object] = []

    def poster(t: int) -> None:
        for i in range(per_thread):
            status, reply = app.post("/rooms/news/notices", {"text": f"{t}/{i}"})
            if (status, reply) != (200, {"sent": 1}):
                failures.append((t, i, status, reply))

    pool = [threading.Thread(target=poster, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(120)
    assert not any(thread.is_alive() for thread in pool)
    assert not failures

    got = [alice.expect("message", "news", timeout=60) for _ in range(threads * per_thread)]
    # Every offset once, in order: the room's history sequenced them all.
    assert [m["id"] for m in got] == list(range(1, threads * per_thread + 1))
    texts = notice_texts(got)
    assert sorted(texts) == sorted(f"{t}/{i}" for t in range(threads) for i in range(per_thread))
    # Each thread's notices in the order it posted them (each POST waited for the last).
    for t in range(threads):
        assert [x for x in texts if x.startswith(f"{t}/")] == [f"{t}/{i}" for i in range(per_thread)]
    alice.send(type="say", room="news", text="sentinel")
    assert [m["text"] for m in alice.messages_until("news", "sentinel")] == ["sentinel"]
