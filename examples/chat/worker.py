"""A browser chat served by WarpSocket itself: rooms, presence, history, typing.

Run it (the page and the WebSocket share one port)::

    warpsocket examples/chat/worker.py --static examples/chat/static --bind 127.0.0.1:3000

and open http://127.0.0.1:3000 in two browser tabs.

How it is built, the way we recommend writing a WarpSocket app:

- Every room is a channel, ``room:NAME``.
- Every membership (one connection in one room) is a **virtual socket** whose
  ``user_prefix`` is ``"NAME|"``: one ``send("room:NAME", json)`` reaches every
  member already labelled with its room, so the page routes ``lobby|{...}`` to its
  lobby tab. Leaving is a single ``delete_virtual_socket``. Messages meant for
  the connection itself (welcome, errors) go to the actual socket id, unprefixed,
  and start with ``{``.
- Connections are spread over worker threads and each worker has its own copy
  of this module, so whatever several connections must agree on lives in the
  shared key/value store and is updated with compare-and-set (``set_key_if``):

  ``chat:history:ROOM``   ``{"seq": N, "messages": [the last 50]}``
  ``chat:presence:ROOM``  ``{"v": N, "members": {"SOCKET_ID": NAME}}``
  ``chat:member:ID``      ``{"name": NAME, "rooms": [...]}`` of one connection

  ``seq`` numbers messages (the page merges history and live messages by id) and
  ``v`` versions the member list (every presence event carries the whole list and
  its version; the page keeps the newest, so events that cross on the way from
  different workers cannot leave a stale list behind).
- ``handle_open`` refuses cross-site pages: a browser's ``Origin`` must name the
  host the page was loaded from (the ``Host`` header). Clients that send no
  ``Origin`` (not browsers) are accepted. Extra origins can be allowed with
  ``--worker-arg '{"allowed_origins": ["https://example.com"]}'``.

Protocol (JSON text messages). The page sends::

    {"type": "hello", "name": "alice"}              pick a name (once, before joining)
    {"type": "join", "room": "lobby"}
    {"type": "leave", "room": "lobby"}
    {"type": "say", "room": "lobby", "text": "hi"}
    {"type": "typing", "room": "lobby"}

and receives, unprefixed: ``welcome`` (``id``, ``name``), ``left`` (``room``),
``error`` (``message``); prefixed with ``ROOM|``: ``joined`` (``members``, ``v``,
``history``), ``message`` (``id``, ``from``, ``name``, ``text``, ``ts``),
``presence`` (``event`` join/leave, ``name``, ``members``, ``v``) and ``typing``
(``from``, ``name``).
"""

from __future__ import annotations

import json
import re
import time
from urllib.parse import urlsplit

import warpsocket

HISTORY = 50
MAX_ROOMS = 20
MAX_TEXT = 2000
ROOM_NAME = re.compile(r"^[a-z0-9_-]{1,12}$")  # + "|" stays within the 15-byte prefix limit

allowed_origins: set[str] = set()

# Per-connection state of the connections on this worker (a connection never moves).
names: dict[int, str] = {}
memberships: dict[int, dict[str, int]] = {}  # socket id -> room -> virtual socket id


def handle_start(worker_arg) -> None:
    if isinstance(worker_arg, dict):
        allowed_origins.update(o.rstrip("/").lower() for o in worker_arg.get("allowed_origins", ()))


# --------------------------------------------------------------------------
# connection lifecycle
# --------------------------------------------------------------------------


def _host_port(netloc: str, default_port: int | None) -> tuple[str, int | None] | None:
    try:
        parts = urlsplit("//" + netloc)
        return (parts.hostname or "").lower(), parts.port or default_port
    except ValueError:
        return None


def origin_allowed(origin: str | None, host: str | None) -> bool:
    if origin is None:
        return True  # not a browser: Origin is the browser's promise, nothing to check
    origin = origin.strip().rstrip("/").lower()
    if origin in allowed_origins:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host:
        return False
    default = 443 if parts.scheme == "https" else 80
    return _host_port(parts.netloc, default) == _host_port(host, default)


def handle_open(socket_id: int, ip: str, headers: dict[str, str]) -> bool:
    if not origin_allowed(headers.get("origin"), headers.get("host")):
        return False  # HTTP 403: a page from another site must not use our users' cookies
    memberships[socket_id] = {}
    return True


def handle_text_message(text: str, socket_id: int) -> None:
    try:
        msg = json.loads(text)
        kind = msg["type"]
    except (ValueError, TypeError, KeyError):
        return error(socket_id, "messages are JSON objects with a 'type'")
    handler = HANDLERS.get(kind) if isinstance(kind, str) else None
    if handler is None:
        return error(socket_id, f"unknown message type {kind!r}")
    if kind != "hello" and socket_id not in names:
        return error(socket_id, "pick a name first")
    handler(socket_id, msg)


def handle_close(socket_id: int) -> None:
    # The connection's virtual sockets (and so its subscriptions) are gone already.
    # The rooms are read from the kv record rather than this worker's globals: if this
    # worker was retired as hung, handle_close runs on its fresh replacement.
    names.pop(socket_id, None)
    memberships.pop(socket_id, None)
    record = warpsocket.set_key(member_key(socket_id))  # read and delete
    if record is None:
        return
    record = json.loads(record)
    for room in record["rooms"]:
        leave_presence(socket_id, room, record["name"])


# --------------------------------------------------------------------------
# messages from the page
# --------------------------------------------------------------------------


def on_hello(socket_id: int, msg: dict) -> None:
    name = msg.get("name")
    if not isinstance(name, str) or not name.strip():
        return error(socket_id, "a name is 1 to 24 characters")
    if memberships[socket_id]:
        return error(socket_id, "leave your rooms before changing your name")
    names[socket_id] = " ".join(name.split())[:24]
    save_member(socket_id)
    send_json(socket_id, {"type": "welcome", "id": socket_id, "name": names[socket_id]})


def on_join(socket_id: int, msg: dict) -> None:
    room = msg.get("room")
    rooms = memberships[socket_id]
    if not isinstance(room, str) or not ROOM_NAME.match(room.strip().lower()):
        return error(socket_id, "room names are 1-12 of a-z 0-9 _ -")
    room = room.strip().lower()
    if room in rooms:
        return
    if len(rooms) >= MAX_ROOMS:
        return error(socket_id, f"at most {MAX_ROOMS} rooms at a time")
    name = names[socket_id]
    member = warpsocket.create_virtual_socket(socket_id, user_prefix=f"{room}|")
    warpsocket.subscribe(member, channel(room))
    rooms[room] = member
    save_member(socket_id)

    presence = update(presence_key(room), lambda p: add_member(p, socket_id, name), {"v": 0, "members": {}})
    history = load(history_key(room), {"seq": 0, "messages": []})["messages"]
    # To this membership only: the state of the room. Live messages may overtake it;
    # the page orders messages by id and member lists by version.
    send_json(member, {"type": "joined", **members_view(presence), "history": history})
    broadcast(
        room, {"type": "presence", "event": "join", "name": name, "from": socket_id, **members_view(presence)}
    )


def on_leave(socket_id: int, msg: dict) -> None:
    room = msg.get("room")
    member = memberships[socket_id].pop(room, None) if isinstance(room, str) else None
    if member is None:
        return
    warpsocket.delete_virtual_socket(member, expected_target=socket_id)  # out of every channel
    save_member(socket_id)
    leave_presence(socket_id, room, names[socket_id])
    send_json(socket_id, {"type": "left", "room": room})


def on_say(socket_id: int, msg: dict) -> None:
    room, text = msg.get("room"), msg.get("text")
    if not isinstance(room, str) or room not in memberships[socket_id]:
        return error(socket_id, "join the room first")
    if not isinstance(text, str) or not text.strip():
        return
    entry = {
        "type": "message",
        "from": socket_id,
        "name": names[socket_id],
        "text": text[:MAX_TEXT],
        "ts": round(time.time() * 1000),
    }

    def append(history):
        entry["id"] = history["seq"] + 1
        return {"seq": entry["id"], "messages": (history["messages"] + [entry])[-HISTORY:]}

    update(history_key(room), append, {"seq": 0, "messages": []})
    broadcast(room, entry)


def on_typing(socket_id: int, msg: dict) -> None:
    room = msg.get("room")
    if isinstance(room, str) and room in memberships[socket_id]:
        broadcast(room, {"type": "typing", "from": socket_id, "name": names[socket_id]})


HANDLERS = {"hello": on_hello, "join": on_join, "leave": on_leave, "say": on_say, "typing": on_typing}


# --------------------------------------------------------------------------
# shared state
# --------------------------------------------------------------------------


def channel(room: str) -> str:
    return f"room:{room}"


def history_key(room: str) -> str:
    return f"chat:history:{room}"


def presence_key(room: str) -> str:
    return f"chat:presence:{room}"


def member_key(socket_id: int) -> str:
    return f"chat:member:{socket_id}"


def load(key: str, default: dict) -> dict:
    raw = warpsocket.get_key(key)
    return default if raw is None else json.loads(raw)


def update(key: str, change, default: dict) -> dict:
    """Apply ``change(value) -> new value`` to a JSON value atomically; return the new value.

    Compare-and-set loop: when another worker wrote the key in between, read it again
    and redo the change, so concurrent updates are never lost.
    """
    while True:
        raw = warpsocket.get_key(key)
        new = change(default if raw is None else json.loads(raw))
        encoded = json.dumps(new, separators=(",", ":"))
        if warpsocket.set_key_if(key, encoded, raw):
            return new


def add_member(presence: dict, socket_id: int, name: str) -> dict:
    return {"v": presence["v"] + 1, "members": {**presence["members"], str(socket_id): name}}


def remove_member(presence: dict, socket_id: int) -> dict:
    members = {sid: n for sid, n in presence["members"].items() if sid != str(socket_id)}
    return {"v": presence["v"] + 1, "members": members}


def leave_presence(socket_id: int, room: str, name: str) -> None:
    presence = update(presence_key(room), lambda p: remove_member(p, socket_id), {"v": 0, "members": {}})
    broadcast(
        room,
        {"type": "presence", "event": "leave", "name": name, "from": socket_id, **members_view(presence)},
    )


def members_view(presence: dict) -> dict:
    members = [{"id": int(sid), "name": n} for sid, n in presence["members"].items()]
    members.sort(key=lambda m: (m["name"].lower(), m["id"]))
    return {"v": presence["v"], "members": members}


def save_member(socket_id: int) -> None:
    record = {"name": names[socket_id], "rooms": sorted(memberships[socket_id])}
    warpsocket.set_key(member_key(socket_id), json.dumps(record))


# --------------------------------------------------------------------------
# sending
# --------------------------------------------------------------------------


def send_json(target: int, payload: dict) -> None:
    warpsocket.send(target, json.dumps(payload, separators=(",", ":")))


def broadcast(room: str, payload: dict) -> None:
    warpsocket.send(channel(room), json.dumps(payload, separators=(",", ":")))


def error(socket_id: int, message: str) -> None:
    send_json(socket_id, {"type": "error", "message": message})
