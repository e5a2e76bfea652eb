"""WarpSocket: multi-threaded WebSocket servers with Python handlers.

The native core accepts and runs the connections on all cores; every connection's
events go, in order, to one worker thread running your handlers. Any thread may
send to sockets.

>>> import warpsocket
>>> server = warpsocket.start(bind="127.0.0.1:3000", worker="app/worker.py")  # doctest: +SKIP
>>> server.stop()  # doctest: +SKIP
"""

from __future__ import annotations

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


def __getattr__(name: str) -> str:
    """``__version__``, read from the installed package's metadata when first asked for.

    Not at import: ``importlib.metadata`` brings email, zipfile and csv with it, ~2 MiB
    of resident memory in every server process (docs/benchmarks.md, "Issue 29: memory
    under load").
    """
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("warpsocket")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        found = "0.0.0"
    globals()["__version__"] = found
    return found


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
