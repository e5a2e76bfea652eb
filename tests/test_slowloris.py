"""Slow handshakes cannot lock prompt clients out (docs/api.md#slow-handshakes).

A crowd of clients that each send half an upgrade request, more of them than
``max_pending_upgrades``, topped up whenever the server drops one, must not keep a
client that sends its request at once from being served promptly.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time

import pytest
from helpers import ask, connect

CAP = 64
SLOW = 3 * CAP
# Several source addresses (all loopback on Linux), as a distributed attacker would use.
SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]
HALF_REQUEST = b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
PROMPT_BOUND = 1.0  # seconds for a prompt client's connect + upgrade + echo, on a loaded machine


class SlowCrowd(threading.Thread):
    """Keeps ``count`` connections open that sent half an upgrade request, reopening
    (every ``top_up`` seconds) each one the server drops."""

    def __init__(self, port: int, count: int, top_up: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.count = count
        self.top_up = top_up
        self.opened = 0
        self.dropped = 0
        self.upgraded = 0
        self._socks: list[socket.socket] = []
        self._halt = threading.Event()
        self.full = threading.Event()

    def _open(self) -> None:
        source = SOURCES[self.opened % len(SOURCES)]
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5, source_address=(source, 0))
        sock.sendall(HALF_REQUEST)
        self._socks.append(sock)
        self.opened += 1

    def run(self) -> None:
        while not self._halt.is_set():
            while len(self._socks) < self.count:
                self._open()
            self.full.set()
            readable, _, _ = select.select(self._socks, [], [], self.top_up)
            for sock in readable:
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if data.startswith(b"HTTP/1.1 101"):
                    self.upgraded += 1
                self.dropped += 1
                self._socks.remove(sock)
                sock.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.mark.timeout(120)
def test_prompt_clients_are_served_while_slow_handshakes_exceed_the_cap(start_server):
    server = start_server(threads=2, max_pending_upgrades=CAP)
    crowd = SlowCrowd(server.port, SLOW)
    crowd.start()
    try:
        assert crowd.full.wait(30), "the slow crowd could not connect"
        took = []
        for i in range(20):
            t0 = time.monotonic()
            try:
                with connect(server, open_timeout=5) as ws:
                    assert ask(ws, f"prompt {i}", timeout=5) == f"prompt {i}"
            except Exception as exc:
                raise AssertionError(
                    f"prompt client {i} was not served with {SLOW} slow handshakes pending "
                    f"(cap {CAP}): {exc!r}"
                ) from exc
            took.append(time.monotonic() - t0)
            time.sleep(0.05)
        # The crowd kept more slow handshakes coming than the cap holds all along.
        assert crowd.is_alive()
        assert crowd.dropped >= SLOW - CAP, (crowd.opened, crowd.dropped)
        assert crowd.upgraded == 0
        took.sort()
        median, worst = took[len(took) // 2], took[-1]
        assert worst < PROMPT_BOUND, f"prompt clients took {median:.3f} s median, {worst:.3f} s max"
    finally:
        crowd.stop()
