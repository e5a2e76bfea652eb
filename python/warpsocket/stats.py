"""``stats()``: the engine's counters plus the live workers."""

from __future__ import annotations

from typing import Any

from . import _core
from .server import running_server


def stats() -> dict[str, Any]:
    """Return a snapshot of the server's counters (API.md §3).

    Keys: ``connections`` (open connections), ``virtual_sockets``, ``channels`` (with
    at least one subscription), ``subscriptions`` (socket/channel pairs), ``keys``,
    ``messages_in``, ``messages_out`` (frames queued to clients), ``bytes_in``,
    ``bytes_out`` (payload bytes), ``backpressure_closes``, and ``workers``: one dict
    per live worker with ``id``, ``connections`` and ``queue_depth``.

    Cluster mode adds ``node_id`` (0 outside a cluster), ``cluster_messages_out``
    (messages handed to Redis for other nodes), ``cluster_messages_in`` (received from
    them) and ``cluster_send_failures`` (cross-node sends lost because Redis was
    unreachable); ``keys`` then counts the keys in Redis, -1 while Redis cannot be asked.
    """
    result: dict[str, Any] = _core.counters()
    server = running_server()
    result["workers"] = server.stats_workers() if server is not None else []
    return result
