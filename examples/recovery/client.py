"""A Python client of examples/recovery/worker.py: shows each message of the room once, in
order, however often the connection drops.

    python examples/recovery/client.py ws://127.0.0.1:3000
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from typing import Any

import websockets

STAMP = re.compile(r"(\d+):")  # "17:hello": the room's message 17


class Follower:
    """The room as this client has seen it (``shown``); ``run()`` keeps it up to date."""

    def __init__(self, url: str) -> None:
        self.url, self.epoch, self.offset = url, "", 0
        self.shown: list[str] = []

    def show(self, offset: int, text: str) -> None:
        self.offset = offset
        self.shown.append(text)

    async def run(self) -> None:
        # Iterating connect() reconnects, backing off while the server cannot be reached.
        async for ws in websockets.connect(self.url):
            pending: list[tuple[int, str]] | None = []  # room messages before the server's answer
            try:
                await ws.send(json.dumps({"type": "resume", "epoch": self.epoch, "offset": self.offset}))
                async for message in ws:
                    if isinstance(message, str) and (stamp := STAMP.match(message)):
                        offset, text = int(stamp[1]), message[stamp.end() :]
                        if pending is None:
                            self.show(offset, text)
                        else:
                            pending.append((offset, text))
                    else:
                        self.answered(json.loads(message), pending or [])
                        pending = None
            except websockets.ConnectionClosed:
                continue

    def answered(self, answer: dict[str, Any], pending: list[tuple[int, str]]) -> None:
        if answer["type"] == "reset":  # a first visit or too much missed: the latest page
            self.epoch, self.shown = answer["epoch"], []
            for offset, text in answer["messages"]:
                self.show(offset, text)
            self.offset = answer["offset"]
        for offset, text in pending:  # after "resumed" all of them, after "reset" those after the page
            if offset > self.offset:
                self.show(offset, text)


class Logged(Follower):
    """Logs each message as it is shown (``shown`` still keeps them all)."""

    def show(self, offset: int, text: str) -> None:
        super().show(offset, text)
        logging.info("%d: %s", offset, text)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    asyncio.run(Logged(sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:3000").run())
