"""The shape of ``stats()`` (which :mod:`warpsocket.server` defines, with the running server).

The engine's keys are those of its table ``_core.STATS_FIELDS``; a test holds
:class:`Stats` to it.
"""

from __future__ import annotations

from typing import TypedDict


class WorkerStats(TypedDict):
    """One live worker in :func:`stats`."""

    id: int
    connections: int
    queue_depth: int


class _ClusterStats(TypedDict, total=False):
    redis_connected: int


class Stats(_ClusterStats):
    """What :func:`stats` returns (docs/api.md#stats, plus the counters the metrics report)."""

    connections: int
    virtual_sockets: int
    channels: int
    subscriptions: int
    keys: int
    history_channels: int
    history_messages: int
    presence_members: int
    messages_in: int
    messages_out: int
    bytes_in: int
    bytes_out: int
    backpressure_closes: int
    rate_limit_closes: int
    connections_refused: int
    messages_compressed: int
    node_id: int
    cluster_messages_out: int
    cluster_messages_in: int
    cluster_send_failures: int
    worker_retirements: int
    handshakes_refused: dict[int, int]
    closes: dict[int, int]
    workers: list[WorkerStats]
