"""Worker module of the recovery storm (benchmarks/recovery_storm.py).

Text commands; answers start with ``!`` so that a client tells them from the stamped
history deliveries (``"OFFSET:DATA"``):

    pub CH DATA        send DATA to channel CH (no answer: the publisher's flow)
    rec CH EPOCH OFF   recover CH for this socket from (EPOCH, OFF); EPOCH and OFF ``-``
                       the first time: from ``position(CH)`` read just before
                       -> !rec CH OK SINCE_OFFSET MICROSECONDS EPOCH
                       OK is 1 or 0 (what ``recover`` returned), ``E`` with the exception's
                       name as EPOCH when it raised; MICROSECONDS is the time the
                       ``recover`` call took in this worker
    pos CH             -> !pos CH OFFSET EPOCH

``recover`` queues the replay inside the call, so the answer reaches the client after every
replayed message; every delivery before and after it must carry the next offset.
"""

from __future__ import annotations

import time

import warpsocket


def handle_text_message(text: str, socket_id: int) -> None:
    """Run one command of the storm's clients and publishers."""
    command, _, rest = text.partition(" ")
    if command == "pub":
        channel, _, data = rest.partition(" ")
        warpsocket.send(channel, data)
    elif command == "rec":
        channel, epoch, offset = rest.split(" ")
        try:
            since = warpsocket.position(channel) if epoch == "-" else (epoch, int(offset))
            start = time.perf_counter()
            recovered = warpsocket.recover(socket_id, channel, since)
            took_us = (time.perf_counter() - start) * 1e6
        except (ConnectionError, ValueError) as exc:
            warpsocket.send(socket_id, f"!rec {channel} E 0 0 {type(exc).__name__}")
            return
        warpsocket.send(socket_id, f"!rec {channel} {int(recovered)} {since[1]} {took_us:.0f} {since[0]}")
    elif command == "pos":
        epoch, last = warpsocket.position(rest)
        warpsocket.send(socket_id, f"!pos {rest} {last} {epoch}")
