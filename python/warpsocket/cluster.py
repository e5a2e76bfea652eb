"""``warpsocket.Cluster``: a cluster's sockets and channels from a process that is no server.

A Django view, a FastAPI endpoint or a Celery task talks to the sockets and channels of
a WarpSocket cluster through its Redis server (docs/api.md#cluster-client)::

    with warpsocket.Cluster("redis://127.0.0.1:6379/0") as cluster:
        cluster.send("room:7", '{"type": "notice"}')

The work is the native core's (``warpsocket._core.Cluster``), which speaks to Redis
exactly as a node does; this module checks the ``history`` option as ``start()`` does
and adds the context manager.
"""

from __future__ import annotations

from types import TracebackType

from . import _core
from .config import HistoryOption, check_history


class Cluster(_core.Cluster):
    """A connection to a cluster's Redis server, for a process that is not a WarpSocket server.

    ``Cluster(url, history=None)`` connects to Redis at ``url`` (``redis://host:port/db``),
    raising ``ConnectionError`` if it cannot be reached within 3 s and ``ValueError`` for a
    malformed URL. ``history`` takes what ``start(history=...)`` takes: give it the nodes'
    own, so that sends to history channels are sequenced and kept as a node's are and
    :meth:`position`/:meth:`history` read them.

    The methods have the semantics they have on a cluster node (docs/api.md#cluster),
    with no socket of this process involved:

    - :meth:`send` returns the number of messages handed to Redis (one per target; 0
      while Redis is unreachable, or for an id no node handed out), not of recipients;
    - :meth:`subscribe`/:meth:`unsubscribe` forward the change to the nodes that own the
      sockets (a channel source: to every node) and return ``[]``: only those nodes know
      which ids changed;
    - :meth:`close` returns True when the close was handed to Redis for the socket's node;
    - :meth:`has_subscriptions` is True when any node has subscribers for the channel
      (False while Redis is unreachable);
    - :meth:`presence` and :meth:`presence_count` answer for the whole cluster;
    - :meth:`get_key`, :meth:`set_key`, :meth:`set_key_if`, :meth:`position`,
      :meth:`history`, :meth:`presence` and :meth:`presence_count` raise
      ``ConnectionError`` when Redis does not answer within 3 s.

    Thread-safe: any number of threads may share one. It runs no worker and needs no
    ``start()``; one native thread does its Redis I/O until :meth:`disconnect` (or the
    end of a ``with`` block), after which every method raises ``RuntimeError``.
    """

    def __new__(cls, url: str, history: HistoryOption | None = None) -> Cluster:
        """Connect to the cluster whose Redis server is at ``url``."""
        if not isinstance(url, str):
            raise TypeError(f"url must be a str, not {type(url).__name__}")
        rules = [
            (prefix.encode() if isinstance(prefix, str) else prefix, rule.size, rule.ttl, rule.stamp)
            for prefix, rule in check_history(history)
        ]
        return super().__new__(cls, url, rules)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.disconnect()
