"""Notices from a FastAPI app to the rooms of the chat example, through ``warpsocket.Cluster``.

The chat (examples/chat/worker.py) runs as a WarpSocket node of a cluster; this app is
no WarpSocket server, only a web application that shares the cluster's Redis::

    redis-server --port 6379
    warpsocket examples/chat/worker.py --static examples/chat/static --bind 127.0.0.1:3000 \\
        --history 'room:=50/86400' --cluster redis://127.0.0.1:6379/0
    uvicorn app:app --app-dir examples/notify --port 8000

    curl -X POST localhost:8000/rooms/lobby/notices -H 'content-type: application/json' \\
        -d '{"text": "maintenance at 18:00"}'

A notice is a chat message (``type: message``) from the sender "notice", sent to the
room's channel ``room:NAME``: every node delivers it to the room's members, and since
``room:`` is a history channel it gets the room's next offset and is kept with the
room's messages, so pages that join later or recover after a reconnect see it too.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import warpsocket
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

REDIS_URL = os.environ.get("WARPSOCKET_REDIS", "redis://127.0.0.1:6379/0")
# The chat nodes' own --history 'room:=50/86400': sends to a room are then sequenced
# and kept exactly as a node's are.
HISTORY = {"room:": warpsocket.History(50, 86400)}
ROOM_NAME = re.compile(r"^[a-z0-9_-]{1,12}$")  # the chat's room names
MAX_TEXT = 2000  # the chat's longest message

# One per process: thread-safe, shared by every request (sync endpoints run in a thread pool).
cluster = warpsocket.Cluster(REDIS_URL, history=HISTORY)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Disconnect from Redis when the server shuts down (ends the Cluster's I/O thread)."""
    yield
    cluster.disconnect()


app = FastAPI(title="WarpSocket chat notices", lifespan=lifespan)


class Notice(BaseModel):
    """The body of ``POST /rooms/{room}/notices``."""

    text: str = Field(min_length=1, max_length=MAX_TEXT)


class Sent(BaseModel):
    """How many messages were handed to Redis (1, or 0 while Redis is unreachable)."""

    sent: int


@app.post("/rooms/{room}/notices")
def post_notice(room: str, notice: Notice) -> Sent:
    """Send ``notice`` to the chat room ``room`` as a message from "notice"."""
    room = room.lower()  # as the chat does with the names pages join
    if not ROOM_NAME.match(room):
        raise HTTPException(status_code=404, detail="room names are 1-12 of a-z 0-9 _ -")
    # The chat's message format; "from" is no socket id: the page never takes it for its own.
    ts = round(time.time() * 1000)
    message = {"type": "message", "from": None, "name": "notice", "text": notice.text, "ts": ts}
    sent = cluster.send(f"room:{room}", json.dumps(message, separators=(",", ":")))
    if not sent:
        raise HTTPException(status_code=503, detail="Redis is unreachable: the notice was not sent")
    return Sent(sent=sent)
