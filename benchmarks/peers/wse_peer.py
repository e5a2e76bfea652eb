"""The performance workload on wse-server (Rust/tokio engine, Python in drain mode).

wse-server (PyPI ``wse-server``, Python >= 3.12) runs the transport in Rust and hands
Python batches of inbound events (``drain_inbound``); this loop is the application. Its
topics are the channels: ``subscribe_connection`` and ``broadcast_local`` (which
includes the sender). wse-server parses a JSON text message into a dict and renames its
``"type"`` key to ``"t"``, so the type is read from there; what it sends goes out as
given (broadcasts get a ``"c":"U"`` field in front, which the generators ignore).

One port (benchmarks/run.py gives it one and spreads the connections over source
addresses): several servers would need this one Python thread to poll them in turn,
which would add waiting that is not wse-server's. Not named ``wse_server.py``: that would
shadow the package it imports. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import signal

from wse_server import RustWSEServer

BUCKET_SIZE = 10
EVENT = {"type": "evt", "t": "This is a message to my dear clients"}
#: The process's file limit on this machine; wse-server refuses connections beyond it.
MAX_CONNECTIONS = 20_000

subscribed = 0
running = True


def handle(server: RustWSEServer, events: list[tuple[str, str | None, object]]) -> None:
    """Apply the workload to one batch of inbound events."""
    global subscribed
    for kind, conn_id, data in events:
        if kind != "msg" or conn_id is None or not isinstance(data, dict):
            continue
        msg_type = data.get("t")
        if msg_type == "req":
            server.broadcast_local(data["channel"], json.dumps(EVENT))
            server.send(conn_id, json.dumps({"type": "ack"}))
        elif msg_type == "sub":
            channel = str(subscribed // BUCKET_SIZE)
            subscribed += 1
            server.subscribe_connection(conn_id, [channel])
            server.send(conn_id, json.dumps({"type": "sub-ack", "ch": channel}))


def stop(signum: int, frame: object) -> None:
    """SIGTERM/SIGINT: leave the drain loop."""
    global running
    running = False


def main() -> None:
    """Serve the workload on one port until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server = RustWSEServer(args.host, args.port, max_connections=MAX_CONNECTIONS)
    server.enable_drain_mode()
    server.start()
    print(f"listening on {args.host}:{args.port}", flush=True)
    while running:
        handle(server, server.drain_inbound(1024, 50))
    server.stop()


if __name__ == "__main__":
    main()
