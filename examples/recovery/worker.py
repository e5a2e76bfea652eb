"""One room whose clients get every message once, in order, however often they reconnect.

    warpsocket examples/recovery/worker.py --history 'room:=1000/300' \
        --static examples/recovery/static --bind 127.0.0.1:3000

then open http://127.0.0.1:3000 (static/client.js), or run
``python examples/recovery/client.py ws://127.0.0.1:3000``. The README's "Recovering after
a reconnect" walks through it; docs/api.md#history has the details.

A client posts ``{"type": "say", "text": ...}`` and, after every (re)connect, sends
``{"type": "resume", "epoch": ..., "offset": ...}``: the epoch the server gave it and the
stamp (``17:`` before the text) of the last room message it got, ``""`` and 0 at first.
"""

from __future__ import annotations

import json

import warpsocket

ROOM = "room:lobby"
PAGE = 100  # what a client gets instead when what it missed is no longer kept


def handle_text_message(text: str, socket_id: int) -> None:
    request = json.loads(text)
    if request["type"] == "say":
        warpsocket.send(ROOM, request["text"])  # stamped "17:..." for every subscriber
    elif request["type"] == "resume":
        if warpsocket.recover(socket_id, ROOM, (request["epoch"], request["offset"])):
            # Whatever was missed is queued before this answer; live messages go on after it.
            warpsocket.send(socket_id, json.dumps({"type": "resumed"}))
            return
        # A first visit, a new epoch, or too much missed: the latest page instead. recover()
        # has subscribed the client all the same, so the client skips what is in both.
        epoch, last = warpsocket.position(ROOM)
        page = warpsocket.history(ROOM, since=max(0, last - PAGE))
        offset = page[-1][0] if page else last
        answer = {"type": "reset", "epoch": epoch, "offset": offset, "messages": page}
        warpsocket.send(socket_id, json.dumps(answer))
