"""A browser chat served by WarpSocket itself: rooms, history, recovery, presence, typing.

Run it (the page and the WebSocket share one port; rooms keep their last 50 messages
for a day)::

    warpsocket examples/chat/worker.py --static examples/chat/static --bind 127.0.0.1:3000 \
        --history 'room:=50/86400'

and open http://127.0.0.1:3000 in two browser tabs. It runs unchanged as a cluster:
start it on several nodes with the same ``--cluster redis://...``.

How it is built, the way we recommend writing a WarpSocket app:

- Every room is two channels: ``room:NAME`` carries its chat messages and is a
  **history channel** (``--history 'room:=50/86400'``: each message gets the next
  offset of the room and the last 50 are kept); ``notes:NAME`` carries what is not
  worth keeping (join/leave and typing notes).
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
- **Who is here: presence.** Each membership's virtual socket is ``track``-ed in
  ``room:NAME`` as its user, the name picked with ``hello``: a user with two tabs (or
  two devices, on two nodes of a cluster) is one member. A page that joins gets the
  room's ``presence()`` once; after that ``handle_presence`` tells the room when a
  user arrives (their first membership) and goes (their last one: a tab that leaves
  or closes while another tab of the same user stays changes nothing). Closing a
  connection or deleting its virtual socket untracks it by itself, so nothing is
  kept per connection but the two dicts below, and in a cluster the members of a
  node that dies leave within seconds, announced once by a live node.
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
``error`` (``message``); prefixed with ``ROOM|``: ``history`` (``epoch``, ``offset``:
the room's last offset, ``messages``: the kept ones, each with its offset as ``id``),
``joined`` (``members``: the names of the users present, sorted, the joining one
included), ``presence`` (``event`` join/leave, ``name``: a user arrived in or left
the room) and ``typing`` (``from``, ``name``); prefixed and stamped, ``ROOM|OFFSET:``:
``message`` (``from``, ``name``, ``text``, ``ts``; its ``id`` is the offset). After a
``join`` with ``since``, either the missed messages arrive (no ``history``), or a
``history`` page does: its messages replace the room's.

The page keeps a room's member list from ``joined`` and applies the ``presence``
notes that follow (adding a name already there, or removing one that is not, changes
nothing). Notes may arrive before ``joined``: ``joined`` replaces the list, and
every change it does not show yet is announced after it (the membership listens to
the notes before the list is read).
"""

from __future__ import annotations

import json
import re
import time
from urllib.parse import urlsplit

import warpsocket

MAX_ROOMS = 20
MAX_TEXT = 2000
ROOM_CHANNEL = "room:"
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
    # The connection's virtual sockets, their subscriptions and their presence are gone
    # already: handle_presence announces the users this was the last membership of.
    names.pop(socket_id, None)
    memberships.pop(socket_id, None)


def handle_presence(ch: str | bytes, member: str, joined: bool) -> None:
    """A user arrived in a room (their first membership) or left it (their last one).

    Runs once per arrival and departure however many tabs the user has, on the worker
    whose connection caused it (in a cluster: once in the whole cluster; for the users
    of a node that died, on a live node).
    """
    if not (isinstance(ch, str) and ch.startswith(ROOM_CHANNEL)):
        return
    room = ch[len(ROOM_CHANNEL) :]
    note(room, {"type": "presence", "event": "join" if joined else "leave", "name": member})


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
    rooms[room] = member
    # Listen to the room's notes before reading who is here, so that every change the
    # list below misses is announced to this membership after it.
    warpsocket.subscribe(member, notes(room))
    # The user's first membership in the room makes them present: handle_presence
    # announces it. Another tab of theirs already there makes this one change nothing.
    warpsocket.track(member, channel(room), name)
    # In a cluster, recover() inside returns once this node listens on the room's
    # channel in Redis, and the node subscribes there in order: by then it listens on
    # the notes channel subscribed above too, and no note of another node is missed.
    catch_up(member, room, since)
    # To this membership only: who is here. Notes may overtake it (the page applies
    # the ones after it) or repeat what it shows (which changes nothing).
    send_json(member, {"type": "joined", "members": members(room, name)})


def on_leave(socket_id: int, msg: dict) -> None:
    room = msg.get("room")
    member = memberships[socket_id].pop(room, None) if isinstance(room, str) else None
    if member is None:
        return
    # Out of every channel and untracked: handle_presence announces the user's leave
    # if this was their last membership in the room.
    warpsocket.delete_virtual_socket(member, expected_target=socket_id)
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
# rooms
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
    """The room's chat messages (a history channel) and its presence."""
    return f"{ROOM_CHANNEL}{room}"


def notes(room: str) -> str:
    """The room's presence and typing notes: not kept, not stamped."""
    return f"notes:{room}"


def members(room: str, name: str) -> list[str]:
    """The names of the users present in ``room``, sorted, ``name`` (the asker) included."""
    try:
        present = warpsocket.presence(channel(room))
    except ConnectionError:
        # A cluster whose Redis does not answer: the page shows at least its own user,
        # and the notes after Redis is back bring the others.
        present = {}
    return sorted({*present, name}, key=lambda n: (n.casefold(), n))


# --------------------------------------------------------------------------
# sending
# --------------------------------------------------------------------------


def send_json(target: int | str, payload: dict) -> None:
    warpsocket.send(target, json.dumps(payload, separators=(",", ":")))


def note(room: str, payload: dict) -> None:
    send_json(notes(room), payload)


def error(socket_id: int, message: str) -> None:
    send_json(socket_id, {"type": "error", "message": message})
