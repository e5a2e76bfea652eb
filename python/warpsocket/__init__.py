"""WarpSocket: multi-threaded WebSocket servers with Python handlers.

The native core accepts and runs the connections on all cores; every connection's
events go, in order, to one worker thread running your handlers. Any thread may
send to sockets.

>>> import warpsocket
>>> server = warpsocket.start(bind="127.0.0.1:3000", worker="app/worker.py")  # doctest: +SKIP
>>> server.stop()  # doctest: +SKIP
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._core import (
    close,
    create_virtual_socket,
    delete_virtual_socket,
    get_key,
    has_subscriptions,
    history,
    position,
    presence,
    presence_count,
    recover,
    send,
    set_key,
    set_key_if,
    subscribe,
    track,
    unsubscribe,
    untrack,
)
from .cluster import Cluster
from .codes import CloseCode, RefusalStatus
from .config import History
from .server import Server, run, start, stats
from .worker import WorkerRetired

try:
    __version__ = version("warpsocket")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "CloseCode",
    "Cluster",
    "History",
    "RefusalStatus",
    "Server",
    "WorkerRetired",
    "close",
    "create_virtual_socket",
    "delete_virtual_socket",
    "get_key",
    "has_subscriptions",
    "history",
    "position",
    "presence",
    "presence_count",
    "recover",
    "run",
    "send",
    "set_key",
    "set_key_if",
    "start",
    "stats",
    "subscribe",
    "track",
    "unsubscribe",
    "untrack",
]
