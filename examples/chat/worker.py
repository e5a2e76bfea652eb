"""A browser chat served by WarpSocket itself: rooms, history, recovery, presence, typing.

Run it (the page and the WebSocket share one port; rooms keep their last 50 messages
for a day)::

    warpsocket examples/chat/worker.py --static examples/chat/static --bind 127.0.0.1:3000 \
        --history 'room:=50/86400'

and open http://127.0.0.1:3000 in two browser tabs.

How it is built, the way we recommend writing a WarpSocket app:

- Every room is two channels: ``room:NAME`` carries its chat messages and is a
  **history channel** (``--history 'room:=50/86400'``: each message gets the next
  offset of the room and the last 50 are kept); ``notes:NAME`` carries what is not
  worth keeping (presence and typing notes).
- Every membership (one connection in one room) is a **virtual socket** whose
  ``user_prefix`` is ``"NAME|"``: one ``send("room:NAME", json)`` reaches every
  member already labelled with its room, so the page routes ``lobby|{...}`` to its
  lobby tab. Chat messages arrive **stamped** with their offset, ``lobby|17:{...}``.
  Leaving is a single ``delete_virtual_socket``. Messages meant for the connection
  itself (welcome, errors) go to the actual socket id, unprefixed, and start with ``{``.
- **History and recovery.** A page that joins gets the room's kept messages as a
  ``history`` page (with the room's epoch and last offset), then the live ones. It
  keeps each room's epoch and last offset; when its connection drops it reconnects
  (to the same server or, with ``?ws=`` alternatives, to another node of a cluster)
  and joins again with ``since``: ``recover()`` then delivers exactly what it missed,
  in order. When the server cannot (a restarted server has a new epoch, or too much
  was missed) the page gets a fresh ``history`` page that replaces the room's messages.
- Connections are spread over worker threads and each worker has its own copy
  of this module, so the member lists, which several connections must agree on,
  live in the shared key/value store and are updated with compare-and-set
  (``set_key_if``):

  ``chat:presence:ROOM``  ``{"v": N, "members": {"SOCKET_ID": NAME}}``
  ``chat:member:ID``      ``{"name": NAME, "rooms": [...]}`` of one connection

  ``v`` versions the member list (every presence event carries the whole list and
  its version; the page keeps the newest, so events that cross on the way from
  different workers cannot leave a stale list behind).
- ``handle_open`` refuses cross-site pages: a browser's ``Origin`` must name the
  host the page was loaded from (the ``Host`` header). Clients that send no
  ``Origin`` (not browsers) are accepted. Extra origins can be allowed with
  ``--worker-arg '{"allowed_origins": ["https://example.com"]}'``.

Protocol (JSON text messages). The page sends::

    {"type": "hello", "name": "alice"}              pick a name (once, before joining)
    {"type": "join", "room": "lobby"}               first time: a history page follows
    {"type": "join", "room": "lobby", "since": ["EPOCH", 17]}    after a reconnect
    {"type": "leave", "room": "lobby"}
    {"type": "say", "room": "lobby", "text": "hi"}
    {"type": "typing", "room": "lobby"}

and receives, unprefixed: ``welcome`` (``id``, ``name``), ``left`` (``room``),
``error`` (``message``); prefixed with ``ROOM|``: ``joined`` (``members``, ``v``),
``history`` (``epoch``, ``offset``: the room's last offset, ``messages``: the kept
ones, each with its offset as ``id``), ``presence`` (``event`` join/leave, ``name``,
``members``, ``v``) and ``typing`` (``from``, ``name``); prefixed and stamped,
``ROOM|OFFSET:``: ``message`` (``from``, ``name``, ``text``, ``ts``; its ``id`` is
the offset). After a ``join`` with ``since``, either the missed messages arrive (no
``history``), or a ``history`` page does: its messages replace the room's.
"""

from __future__ import annotations

import json
import re
import time
from urllib.parse import urlsplit

import warpsocket

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
    try:
        warpsocket.position(channel("lobby"))
    except ValueError:
        # Fail at start, not at the first join: rooms need the history option.
        raise RuntimeError("the chat needs room history: run it with --history 'room:=50/86400'") from None


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
    since = msg.get("since")
    if since is not None:
        since = position_of(since)
        if since is None:
            return error(socket_id, "since is [epoch, offset]")
    name = names[socket_id]
    member = warpsocket.create_virtual_socket(socket_id, user_prefix=f"{room}|")
    warpsocket.subscribe(member, notes(room))
    rooms[room] = member
    save_member(socket_id)

    presence = update(presence_key(room), lambda p: add_member(p, socket_id, name), {"v": 0, "members": {}})
    # To this membership only: who is here. Presence notes may overtake it; the page
    # keeps the member list with the highest version.
    send_json(member, {"type": "joined", **members_view(presence)})
    catch_up(member, room, since)
    presence_note(room, "join", socket_id, name, presence)


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
    # The room's history keeps it and numbers it: its offset (the stamp) is its id.
    send_json(channel(room), entry)


def on_typing(socket_id: int, msg: dict) -> None:
    room = msg.get("room")
    if isinstance(room, str) and room in memberships[socket_id]:
        note(room, {"type": "typing", "from": socket_id, "name": names[socket_id]})


HANDLERS = {"hello": on_hello, "join": on_join, "leave": on_leave, "say": on_say, "typing": on_typing}


# --------------------------------------------------------------------------
# history
# --------------------------------------------------------------------------


def catch_up(member: int, room: str, since: tuple[str, int] | None) -> None:
    """Subscribe ``member`` to the room's messages and bring its page up to date.

    Whatever path is taken, the page gets every kept message once and in offset
    order, then the live ones: ``recover`` closes the seam between the two.
    """
    ch = channel(room)
    if since is not None:
        if warpsocket.recover(member, ch, since):
            return  # what the page missed is on its way, stamped like live messages
        # Subscribed anyway: undo that, the page below is followed by a recover of its own.
        warpsocket.unsubscribe(member, ch)
    while True:
        epoch, last = warpsocket.position(ch)
        # Messages after `last` (sent meanwhile) are left to the recover below.
        kept = [(offset, data) for offset, data in warpsocket.history(ch) if offset <= last]
        messages = [{**json.loads(data), "id": offset} for offset, data in kept]
        send_json(member, {"type": "history", "epoch": epoch, "offset": last, "messages": messages})
        if warpsocket.recover(member, ch, (epoch, last)):
            return
        # Lost a race: the epoch changed or more than the kept number of messages were
        # sent since position(). The next page replaces this one on the page.
        warpsocket.unsubscribe(member, ch)


# --------------------------------------------------------------------------
# shared state
# --------------------------------------------------------------------------


def position_of(value: object) -> tuple[str, int] | None:
    """A page's ``[epoch, offset]`` as ``recover()`` takes it, or None if malformed."""
    if not (isinstance(value, list) and len(value) == 2):
        return None
    epoch, offset = value
    if not (isinstance(epoch, str) and epoch and type(offset) is int and offset >= 0):
        return None  # type() rather than isinstance(): true and false are not offsets
    return epoch, offset


def channel(room: str) -> str:
    """The room's chat messages: a history channel."""
    return f"room:{room}"


def notes(room: str) -> str:
    """The room's presence and typing notes: not kept, not stamped."""
    return f"notes:{room}"


def presence_key(room: str) -> str:
    return f"chat:presence:{room}"


def member_key(socket_id: int) -> str:
    return f"chat:member:{socket_id}"


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
    presence_note(room, "leave", socket_id, name, presence)


def presence_note(room: str, event: str, socket_id: int, name: str, presence: dict) -> None:
    payload = {"type": "presence", "event": event, "name": name, "from": socket_id}
    note(room, {**payload, **members_view(presence)})


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


def send_json(target: int | str, payload: dict) -> None:
    warpsocket.send(target, json.dumps(payload, separators=(",", ":")))


def note(room: str, payload: dict) -> None:
    send_json(notes(room), payload)


def error(socket_id: int, message: str) -> None:
    send_json(socket_id, {"type": "error", "message": message})
