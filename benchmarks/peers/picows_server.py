"""The performance workload on picows (single process, asyncio).

One ``WSListener`` per connection; channels are a dict of sets of transports and a
request sends the event to each. See docs/benchmarks.md for the workload.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import defaultdict

from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

BUCKET_SIZE = 10
EVENT = {"type": "evt", "t": "This is a message to my dear clients"}

channels: dict[str, set[WSTransport]] = defaultdict(set)
subscribed = 0


class PerfListener(WSListener):
    def __init__(self) -> None:
        self.channel: str | None = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        global subscribed
        if frame.msg_type != WSMsgType.TEXT:
            return
        msg = json.loads(frame.get_payload_as_utf8_text())
        kind = msg.get("type")
        if kind == "req":
            event = json.dumps(EVENT).encode()
            for peer in channels[msg["channel"]]:
                peer.send(WSMsgType.TEXT, event)
            transport.send(WSMsgType.TEXT, json.dumps({"type": "ack"}).encode())
        elif kind == "sub":
            self.channel = str(subscribed // BUCKET_SIZE)
            subscribed += 1
            channels[self.channel].add(transport)
            reply = {"type": "sub-ack", "ch": self.channel}
            transport.send(WSMsgType.TEXT, json.dumps(reply).encode())

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.channel is not None:
            channels[self.channel].discard(transport)


def listener_factory(request: WSUpgradeRequest) -> PerfListener:
    return PerfListener()


async def main(host: str, ports: list[int]) -> None:
    servers = [await ws_create_server(listener_factory, host, port, backlog=4096) for port in ports]
    print(f"listening on {host}:{','.join(map(str, ports))}", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, action="append", required=True)
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port))
