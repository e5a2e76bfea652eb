"""The performance workload on the ``websockets`` asyncio server (single process).

Channels are a dict of sets of connections; a request is fanned out with
``websockets.broadcast``. See docs/benchmarks.md for the workload.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import defaultdict

from websockets.asyncio.server import ServerConnection, broadcast, serve

BUCKET_SIZE = 10
EVENT = {"type": "evt", "t": "This is a message to my dear clients"}

channels: dict[str, set[ServerConnection]] = defaultdict(set)
subscribed = 0


async def handler(ws: ServerConnection) -> None:
    global subscribed
    mine: str | None = None
    try:
        async for text in ws:
            msg = json.loads(text)
            kind = msg.get("type")
            if kind == "req":
                broadcast(channels[msg["channel"]], json.dumps(EVENT))
                await ws.send(json.dumps({"type": "ack"}))
            elif kind == "sub":
                mine = str(subscribed // BUCKET_SIZE)
                subscribed += 1
                channels[mine].add(ws)
                await ws.send(json.dumps({"type": "sub-ack", "ch": mine}))
    finally:
        if mine is not None:
            channels[mine].discard(ws)


async def main(host: str, ports: list[int]) -> None:
    servers = [await serve(handler, host, port, backlog=4096) for port in ports]
    print(f"listening on {host}:{','.join(map(str, ports))}", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, action="append", required=True)
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port))
