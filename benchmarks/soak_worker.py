"""Worker module of the soak benchmark (benchmarks/soak.py); loaded by benchmarks/soak_server.py.

Clients drive it with text commands; every answer starts with ``!`` so that a client
tells answers from the broadcasts of the publisher (``"<channel> <seq> ..."``, prefixed
with the virtual socket's prefix when they arrive through one):

    sub CH          subscribe this socket to CH            -> !sub CH K
    unsub CH        unsubscribe it                          -> !unsub CH M
    vsub CH P       virtual socket with prefix P, in CH     -> !vsub P K
    vdel P          delete that virtual socket              -> !vdel P M
    cas             increment the shared counter (set_key_if loop) -> !cas VALUE
    rec CH E O [P]  recover CH from (E, O) for this socket, or for a new virtual socket with
                    prefix P; E and O ``-`` the first time: from ``position(CH)``
                    -> !rec CH OK SINCE EPOCH1 POS1 EPOCH2 POS2
    bye             the server closes the connection with 4000
    track CH M [P]  track this socket (or its virtual socket with prefix P) in CH as member M
                    -> !track CH J (J: 1 if M joined CH, else 0)
    untrack CH [P]  untrack it                             -> !untrack CH L (L: 1 if M left)
    flood           send 8 KiB binary messages to this socket until the server stops
                    queueing them (the client does not read: backpressure limit, 1008)

K is the publisher's sequence number of CH read *after* subscribing: every broadcast
numbered K+1 or later must reach the subscriber. M is read *before* unsubscribing: every
broadcast up to M-1 was queued before the answer. benchmarks/soak.py checks both.

``rec`` is for the history channels (stamped deliveries ``"<offset>:<channel> <seq> ..."``).
OK is 1 or 0 (what ``recover`` returned), SINCE the offset it was given, (EPOCH1, POS1)
``position(CH)`` just before the call and (EPOCH2, POS2) just after. ``recover`` queues its
replay inside the call, so the answer, queued after it, reaches the client after every
replayed message (and maybe after some live ones): the client keeps that channel's
deliveries aside until the answer comes, then checks them against it. The channel's last
offset when ``recover`` held its lock is between POS1 and POS2, which makes both the
expected result and the first offset the client must get exact (see benchmarks/soak.py).

What the worker checks itself goes to the kv list ``soak:violations``: handle_open and
handle_close exactly once per socket (a ``soak:live:<id>`` key is created and deleted with
compare-and-set), sends to a socket in its handle_close count 0, and the flood ends.
Opens, closes and counter increments are counted in kv with compare-and-set loops that
several workers contend on. ``handle_presence`` keeps a ``soak:pres:<channel>:<member>``
key while the member is present (created on its join, deleted on its leave, both with
compare-and-set, so a change reported twice, or a leave without its join, is a
violation) and counts the joins and leaves in ``soak:pres:joins`` / ``soak:pres:leaves``.
"""

from __future__ import annotations

import uuid

import warpsocket

FLOOD_CHUNK = b"\xa5" * 8192
# The flood stops with a violation after this many bytes were queued without a 1008.
FLOOD_CAP = 64 << 20

# This worker's id, for its own kv counter (one writer per key).
WORKER_ID = uuid.uuid4().hex[:12]
cas_done = 0
# socket id -> prefix -> (virtual socket id, channel)
virtual: dict[int, dict[str, tuple[int, str]]] = {}


def seq_key(channel: str) -> str:
    return f"soak:seq:{channel}"


def current_seq(channel: str) -> int:
    value = warpsocket.get_key(seq_key(channel))
    return 0 if value is None else int(value)


def increment(key: str) -> int:
    """Add one to the int under ``key`` with a compare-and-set loop; return the new value."""
    while True:
        old = warpsocket.get_key(key)
        new = (0 if old is None else int(old)) + 1
        if warpsocket.set_key_if(key, str(new), old):
            return new


def append(key: str, line: str) -> None:
    while True:
        old = warpsocket.get_key(key)
        new = line.encode() if old is None else old + b"\n" + line.encode()
        if warpsocket.set_key_if(key, new, old):
            return


def violation(text: str) -> None:
    append("soak:violations", text)


def handle_start(worker_arg: object) -> None:
    append("soak:workers", WORKER_ID)


def handle_open(socket_id: int, ip: str, headers: dict[str, str]) -> bool:
    if not warpsocket.set_key_if(f"soak:live:{socket_id}", b"1", None):
        violation(f"handle_open twice for socket {socket_id}")
    increment("soak:opens")
    virtual[socket_id] = {}
    return True


def handle_close(socket_id: int) -> None:
    if warpsocket.send(socket_id, "late") != 0:
        violation(f"send to socket {socket_id} in its handle_close was queued")
    if not warpsocket.set_key_if(f"soak:live:{socket_id}", None, b"1"):
        violation(f"handle_close twice or without handle_open for socket {socket_id}")
    if virtual.pop(socket_id, None) is None:
        violation(f"handle_close for socket {socket_id} with no state on this worker")
    increment("soak:closes")


def handle_presence(channel: str | bytes, member: str, joined: bool) -> None:
    # Every socket of a soak member is one connection and its virtual sockets, all on
    # this worker: its changes reach this handler in the order they happened, so the
    # state key must go absent -> present -> absent, each change once.
    key = f"soak:pres:{channel!s}:{member}"
    if joined and not warpsocket.set_key_if(key, b"1", None):
        violation(f"{member} joined {channel!s} twice without a leave")
    elif not joined and not warpsocket.set_key_if(key, None, b"1"):
        violation(f"{member} left {channel!s} without having joined")
    increment("soak:pres:joins" if joined else "soak:pres:leaves")


def handle_text_message(text: str, socket_id: int) -> None:
    global cas_done
    command, *args = text.split(" ")
    if command == "sub":
        (channel,) = args
        warpsocket.subscribe(socket_id, channel)
        warpsocket.send(socket_id, f"!sub {channel} {current_seq(channel)}")
    elif command == "unsub":
        (channel,) = args
        last = current_seq(channel)
        warpsocket.unsubscribe(socket_id, channel)
        warpsocket.send(socket_id, f"!unsub {channel} {last}")
    elif command == "vsub":
        channel, prefix = args
        virtual_id = warpsocket.create_virtual_socket(socket_id, prefix)
        virtual[socket_id][prefix] = (virtual_id, channel)
        warpsocket.subscribe(virtual_id, channel)
        warpsocket.send(socket_id, f"!vsub {prefix} {current_seq(channel)}")
    elif command == "vdel":
        (prefix,) = args
        virtual_id, channel = virtual[socket_id].pop(prefix)
        last = current_seq(channel)
        if not warpsocket.delete_virtual_socket(virtual_id, expected_target=socket_id):
            violation(f"virtual socket {virtual_id} of socket {socket_id} was not deleted")
        warpsocket.send(socket_id, f"!vdel {prefix} {last}")
    elif command == "rec":
        channel, epoch, offset, *route = args
        target = socket_id
        if route:
            try:
                target = warpsocket.create_virtual_socket(socket_id, route[0])
            except ValueError:
                # The client may drop the connection before the answer: a gone connection
                # gets no virtual socket. A connection that still takes messages must.
                if warpsocket.send(socket_id, "!gone"):
                    violation(f"no virtual socket for socket {socket_id}, which is open")
                return
            virtual[socket_id][route[0]] = (target, channel)
        before = warpsocket.position(channel)
        since = before if epoch == "-" else (epoch, int(offset))
        recovered = warpsocket.recover(target, channel, since)
        after = warpsocket.position(channel)
        warpsocket.send(
            socket_id,
            f"!rec {channel} {int(recovered)} {since[1]} {before[0]} {before[1]} {after[0]} {after[1]}",
        )
    elif command == "track":
        channel, member, *route = args
        target = virtual[socket_id][route[0]][0] if route else socket_id
        joined = warpsocket.track(target, channel, member)
        warpsocket.send(socket_id, f"!track {channel} {int(joined)}")
    elif command == "untrack":
        channel, *route = args
        target = virtual[socket_id][route[0]][0] if route else socket_id
        left = warpsocket.untrack(target, channel)
        warpsocket.send(socket_id, f"!untrack {channel} {int(left)}")
    elif command == "cas":
        value = increment("soak:cas")
        cas_done += 1
        warpsocket.set_key(f"soak:cas:{WORKER_ID}", str(cas_done))
        warpsocket.send(socket_id, f"!cas {value}")
    elif command == "bye":
        if not warpsocket.close(socket_id, 4000, "bye"):
            violation(f"close() of open socket {socket_id} returned False")
    elif command == "flood":
        queued = 0
        while warpsocket.send(socket_id, FLOOD_CHUNK):
            queued += len(FLOOD_CHUNK)
            if queued > FLOOD_CAP:
                violation(f"socket {socket_id} queued {queued} bytes without a backpressure close")
                warpsocket.close(socket_id, 4001, "flood cap")
                return
    else:
        violation(f"unknown command {text!r} from socket {socket_id}")
