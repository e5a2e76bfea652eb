"""The performance workload on aiohttp's ``web.WebSocketResponse`` (single process).

Channels are a dict of sets of responses; a request awaits ``send_str`` to each
subscriber. See docs/benchmarks.md for the workload.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import defaultdict

from aiohttp import WSMsgType, web

BUCKET_SIZE = 10
EVENT = {"type": "evt", "t": "This is a message to my dear clients"}

channels: dict[str, set[web.WebSocketResponse]] = defaultdict(set)
subscribed = 0


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    global subscribed
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    mine: str | None = None
    try:
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            msg = json.loads(message.data)
            kind = msg.get("type")
            if kind == "req":
                event = json.dumps(EVENT)
                for peer in list(channels[msg["channel"]]):
                    try:
                        await peer.send_str(event)
                    except ConnectionResetError:
                        pass  # the peer is going away; its handler cleans up
                await ws.send_str(json.dumps({"type": "ack"}))
            elif kind == "sub":
                mine = str(subscribed // BUCKET_SIZE)
                subscribed += 1
                channels[mine].add(ws)
                await ws.send_str(json.dumps({"type": "sub-ack", "ch": mine}))
    finally:
        if mine is not None:
            channels[mine].discard(ws)
    return ws


async def main(host: str, ports: list[int]) -> None:
    app = web.Application()
    app.router.add_get("/", websocket_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for port in ports:
        await web.TCPSite(runner, host, port, backlog=4096).start()
    print(f"listening on {host}:{','.join(map(str, ports))}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, action="append", required=True)
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port))
