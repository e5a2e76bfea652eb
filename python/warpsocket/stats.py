"""``stats()``: the engine's counters plus the live workers."""

from __future__ import annotations

from typing import TypedDict, cast

from . import _core
from .server import running_server


class WorkerStats(TypedDict):
    """One live worker in :func:`stats`."""

    id: int
    connections: int
    queue_depth: int


class Stats(TypedDict):
    """What :func:`stats` returns (API.md §3)."""

    connections: int
    virtual_sockets: int
    channels: int
    subscriptions: int
    keys: int
    messages_in: int
    messages_out: int
    bytes_in: int
    bytes_out: int
    backpressure_closes: int
    messages_compressed: int
    node_id: int
    cluster_messages_out: int
    cluster_messages_in: int
    cluster_send_failures: int
    workers: list[WorkerStats]


def stats() -> Stats:
    """Return a snapshot of the server's counters (API.md §3).

    Keys: ``connections`` (open connections), ``virtual_sockets``, ``channels`` (with
    at least one subscription), ``subscriptions`` (socket/channel pairs), ``keys``,
    ``messages_in``, ``messages_out`` (frames queued to clients), ``bytes_in``,
    ``bytes_out`` (payload bytes, uncompressed), ``backpressure_closes``,
    ``messages_compressed`` (outgoing messages deflated with ``compression=True``: a
    broadcast counts once, however many recipients get it compressed), and ``workers``:
    one dict per live worker with ``id``, ``connections`` and ``queue_depth``.

    Cluster mode adds ``node_id`` (0 outside a cluster), ``cluster_messages_out``
    (messages handed to Redis for other nodes), ``cluster_messages_in`` (received from
    them) and ``cluster_send_failures`` (cross-node sends lost because Redis was
    unreachable); ``keys`` then counts the keys in Redis, -1 while Redis cannot be asked.
    """
    server = running_server()
    workers = server.stats_workers() if server is not None else []
    # The core's dict has every key of Stats but "workers" (crates/warpsocket-py, counters()).
    return cast(Stats, {**_core.counters(), "workers": workers})
