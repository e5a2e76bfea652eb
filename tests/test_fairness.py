"""Fair turns and abuse limits (docs/api.md#fairness-and-abuse-limits), against a real server.

A worker serves its connections in turns, so a flooding connection slows only itself;
``max_message_rate`` closes a too-fast connection with 1008 before its excess reaches a
handler; ``max_connections`` and ``max_connections_per_ip`` refuse upgrades with 503 and
429 before ``handle_open``.
"""

from __future__ import annotations

import pytest
import warpsocket
from helpers import connect, read_lines, wait_for
from websockets.exceptions import ConnectionClosed, InvalidStatus

# Each message takes 20 ms of blocking work, as a database call would; the order
# handlers ran in goes to a log file, one line per message.
SLOW_WORKER = """
import time

LOG = {log!r}

def handle_text_message(text, socket_id):
    time.sleep(0.02)
    with open(LOG, "a") as f:
        f.write(text + "\\n")
"""

# Logs every handle_open and every message, and echoes.
COUNTING_WORKER = """
import warpsocket

LOG = {log!r}

def _log(line):
    with open(LOG, "a") as f:
        f.write(line + "\\n")

def handle_open(socket_id, ip, headers):
    _log("open " + headers[":path"])
    return True

def handle_text_message(text, socket_id):
    _log("text " + text)
    warpsocket.send(socket_id, text)
"""


def test_a_second_connection_is_served_between_a_floods_messages(start_server, log_path) -> None:
    """One worker, 64 messages of a first connection waiting: a second's message runs within a few turns."""
    server = start_server(SLOW_WORKER.format(log=str(log_path)), threads=1)
    with connect(server) as first, connect(server) as second:
        for i in range(64):
            first.send(f"a{i}")
        # The worker is in the first of them: the rest wait in its queue.
        wait_for(lambda: read_lines(log_path), timeout=30, message="the first message handled")
        second.send("b")
        wait_for(lambda: "b" in read_lines(log_path), timeout=60, message="the second's message handled")
        before = read_lines(log_path).index("b")
        # First-in first-out ran all 64 before it; in turns it waits behind one or two.
        assert before <= 4, read_lines(log_path)
        wait_for(lambda: len(read_lines(log_path)) == 65, timeout=60, message="all 65 messages handled")
    order = [line for line in read_lines(log_path) if line != "b"]
    assert order == [f"a{i}" for i in range(64)], "a connection's own order is kept"


def test_a_connection_over_max_message_rate_is_closed_with_1008(start_server, log_path) -> None:
    """A burst of ``rate`` messages passes; a flood past it is closed and never reaches the handler."""
    server = start_server(COUNTING_WORKER.format(log=str(log_path)), max_message_rate=20)
    before = warpsocket.stats()["rate_limit_closes"]
    with connect(server) as calm, connect(server) as flood:
        for i in range(20):
            flood.send(f"burst{i}")
        assert [flood.recv(timeout=30) for _ in range(20)] == [f"burst{i}" for i in range(20)]
        with pytest.raises(ConnectionClosed) as closed:
            # The close may come while it is still sending.
            for i in range(200):
                flood.send(f"flood{i}")
            while True:
                flood.recv(timeout=30)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "rate limit")
        # The other connection goes on.
        calm.send("still here")
        assert calm.recv(timeout=30) == "still here"
    assert warpsocket.stats()["rate_limit_closes"] == before + 1
    handled = [line for line in read_lines(log_path) if line.startswith("text flood")]
    # The bucket refills at 20 per second: only the few due during the flood get through.
    assert len(handled) < 20, handled


def test_max_connections_refuses_with_503_and_frees_a_slot_on_close(start_server, log_path) -> None:
    """Past ``max_connections`` an upgrade gets 503, without handle_open; a close makes room."""
    server = start_server(COUNTING_WORKER.format(log=str(log_path)), max_connections=2)
    before = warpsocket.stats()["connections_refused"]
    first = connect(server, "/one")
    with connect(server, "/two"):
        with pytest.raises(InvalidStatus) as refused:
            connect(server, "/three")
        assert refused.value.response.status_code == 503
        assert "open /three" not in read_lines(log_path)
        assert warpsocket.stats()["connections_refused"] == before + 1
        first.close()

        def reconnects():
            try:
                return connect(server, "/four")
            except InvalidStatus:
                return None

        with wait_for(reconnects, timeout=30, message="a slot freed by the close") as fourth:
            fourth.send("hi")
            assert fourth.recv(timeout=30) == "hi"
    assert "open /four" in read_lines(log_path)


def test_max_connections_per_ip_refuses_with_429_per_address(start_server, log_path) -> None:
    """One address holds at most ``max_connections_per_ip``; another address is not held back."""
    server = start_server(COUNTING_WORKER.format(log=str(log_path)), max_connections_per_ip=1)
    before = warpsocket.stats()["connections_refused"]
    with connect(server, "/one") as first:
        with pytest.raises(InvalidStatus) as refused:
            connect(server, "/two")
        assert refused.value.response.status_code == 429
        assert "open /two" not in read_lines(log_path)
        # 127.0.0.2 is another loopback address: another source.
        with connect(server, "/elsewhere", source_address=("127.0.0.2", 0)) as other:
            other.send("hi")
            assert other.recv(timeout=30) == "hi"
        first.send("still")
        assert first.recv(timeout=30) == "still"
    assert warpsocket.stats()["connections_refused"] == before + 1

    def reconnects():
        try:
            return connect(server, "/three")
        except InvalidStatus:
            return None

    with wait_for(reconnects, timeout=30, message="the address's slot freed by the close"):
        pass


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("max_message_rate", "10", TypeError),
        ("max_message_rate", True, TypeError),
        ("max_message_rate", 0, ValueError),
        ("max_message_rate", -1.0, ValueError),
        ("max_message_rate", float("nan"), ValueError),
        ("max_message_rate", float("inf"), ValueError),
        ("max_connections", 1.5, TypeError),
        ("max_connections", 0, ValueError),
        ("max_connections_per_ip", "2", TypeError),
        ("max_connections_per_ip", -3, ValueError),
    ],
)
def test_bad_limits_are_refused_naming_the_option(name, value, error, write_worker) -> None:
    """A bad limit raises before anything starts, and the message names it."""
    with pytest.raises(error, match=name):
        warpsocket.start(worker=str(write_worker("")), bind="127.0.0.1:0", **{name: value})
