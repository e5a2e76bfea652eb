"""Chat rooms over plain text, the way we recommend writing a WarpSocket app.

Try it with any WebSocket client, e.g. ``python -m websockets ws://127.0.0.1:3000``:

    /nick alice          choose a name
    /join lobby          join a room (you can be in several)
    lobby: hello all     say something in a room
    /leave lobby         leave it again
    /rooms               list your rooms

Every room is a channel. Each membership is a virtual socket with the room as
its prefix, so one broadcast reaches every member already labelled ("[lobby] ...")
and leaving is a single ``delete_virtual_socket`` however many channels the
membership was subscribed to. Per-connection state lives in module globals: a
connection's events always run on the same worker thread, so no locks are needed.
"""

from __future__ import annotations

import re

import warpsocket

ROOM_NAME = re.compile(r"^[a-z0-9_-]{1,12}$")

names: dict[int, str] = {}
memberships: dict[int, dict[str, int]] = {}  # socket id -> room -> virtual socket id


def channel(room: str) -> str:
    return f"room:{room}"


def handle_open(socket_id: int, ip: str, headers: dict[str, str]) -> bool:
    names[socket_id] = f"guest{socket_id}"
    memberships[socket_id] = {}
    warpsocket.send(socket_id, "welcome! /nick NAME, /join ROOM, ROOM: text, /leave ROOM, /rooms")
    return True


def handle_text_message(text: str, socket_id: int) -> None:
    rooms = memberships[socket_id]
    if text.startswith("/nick "):
        names[socket_id] = text[6:].strip()[:20] or names[socket_id]
        warpsocket.send(socket_id, f"you are now {names[socket_id]}")
    elif text.startswith("/join "):
        join(socket_id, text[6:].strip().lower())
    elif text.startswith("/leave "):
        leave(socket_id, text[7:].strip().lower())
    elif text == "/rooms":
        warpsocket.send(socket_id, "rooms: " + (", ".join(sorted(rooms)) or "none"))
    elif ":" in text and text.split(":", 1)[0] in rooms:
        room, said = text.split(":", 1)
        warpsocket.send(channel(room), f"{names[socket_id]}: {said.strip()}")
    else:
        warpsocket.send(socket_id, "not understood; join a room first, then send 'ROOM: text'")


def join(socket_id: int, room: str) -> None:
    rooms = memberships[socket_id]
    if not ROOM_NAME.match(room):
        warpsocket.send(socket_id, "room names are 1-12 of a-z 0-9 _ -")
        return
    if room in rooms:
        return
    member = warpsocket.create_virtual_socket(socket_id, user_prefix=f"[{room}] ")
    warpsocket.subscribe(member, channel(room))
    rooms[room] = member
    warpsocket.send(channel(room), f"* {names[socket_id]} joined")


def leave(socket_id: int, room: str) -> None:
    member = memberships[socket_id].pop(room, None)
    if member is None:
        return
    warpsocket.delete_virtual_socket(member, expected_target=socket_id)
    warpsocket.send(socket_id, f"[{room}] you left")
    warpsocket.send(channel(room), f"* {names[socket_id]} left")


def handle_close(socket_id: int) -> None:
    # The connection's virtual sockets are already gone, and with them its
    # subscriptions; tell the rooms it was in.
    name = names.pop(socket_id, "?")
    for room in memberships.pop(socket_id, {}):
        warpsocket.send(channel(room), f"* {name} left")
