"""Type stubs for the native module built from crates/warpsocket-py."""

from collections.abc import Callable
from typing import Any, Literal, TypeAlias, final, overload

from typing_extensions import Self, disjoint_base

__all__ = [
    "Server",
    "Cluster",
    "WorkerQueue",
    "HandlerTimings",
    "send",
    "close",
    "subscribe",
    "unsubscribe",
    "has_subscriptions",
    "create_virtual_socket",
    "delete_virtual_socket",
    "get_key",
    "set_key",
    "set_key_if",
    "position",
    "history",
    "recover",
    "track",
    "untrack",
    "presence",
    "presence_count",
    "resolve_open",
    "counters",
    "join_cluster",
    "leave_cluster",
    "log_fd",
    "take_log_records",
    "DRAIN_BATCH",
    "HANDLER_KINDS",
    "CLOSE_CODES",
    "REFUSAL_STATUSES",
    "STATS_FIELDS",
    "DEFAULT_BIND",
]

#: Events a worker takes from its queue per drain.
DRAIN_BATCH: int
#: ``(name, kind)`` of each handler kind, the ``kind`` of the queue's events (``warpsocket.codes``).
HANDLER_KINDS: tuple[tuple[str, int], ...]
#: ``(name, code)`` of each close code the server sends, and ``NO_CODE`` (1005).
CLOSE_CODES: tuple[tuple[str, int], ...]
#: ``(name, status)`` of each HTTP status an upgrade request is refused with.
REFUSAL_STATUSES: tuple[tuple[str, int], ...]
#: ``(key, metric type, label, help)`` of each key of :func:`counters`, in its order:
#: type ``"gauge"`` or ``"counter"``, label the name of a counter's label (its value a
#: dict by code) or None.
STATS_FIELDS: tuple[tuple[str, str, str | None, str], ...]
#: The address a server binds when none is given.
DEFAULT_BIND: str

_Name: TypeAlias = str | bytes | bytearray | memoryview
_Target: TypeAlias = int | _Name | list[int | _Name]

def send(target: _Target, data: _Name) -> int:
    """Queue ``data`` (str: text, bytes-like: binary) for ``target``; return the recipient count."""

def close(socket_id: int, code: int = 1000, reason: str = "") -> bool:
    """Start closing a connection (or the one a virtual socket resolves to)."""

def subscribe(target: _Target, channel: _Name, delta: int = 1) -> list[int]:
    """Add ``delta`` to the subscription counts; return the ids that became subscribed."""

def unsubscribe(target: _Target, channel: _Name, delta: int = 1) -> list[int]:
    """Subtract ``delta``; return the ids whose count reached 0."""

def has_subscriptions(channel: _Name) -> bool:
    """Return True if any subscriber of ``channel`` resolves to an open connection."""

def create_virtual_socket(socket_id: int, user_prefix: _Name | None = None) -> int:
    """Create a virtual socket pointing at ``socket_id``; return its id."""

def delete_virtual_socket(virtual_socket_id: int, expected_target: int | None = None) -> bool:
    """Delete a virtual socket (only if it points at ``expected_target``, when given)."""

def get_key(key: _Name) -> bytes | None:
    """Return the value stored under ``key``, or None."""

def set_key(key: _Name, value: _Name | None = None) -> bytes | None:
    """Store ``value`` (None deletes); return the previous value."""

def set_key_if(key: _Name, new_value: _Name | None = None, check_value: _Name | None = None) -> bool:
    """Compare-and-set: store ``new_value`` if the current value equals ``check_value``."""

def position(channel: _Name) -> tuple[str, int]:
    """``(epoch, offset)`` of a history channel's last message (offset 0: none yet).

    Raises ValueError when no prefix of the ``history`` option covers ``channel``.
    """

def history(channel: _Name, since: int = 0, limit: int | None = None) -> list[tuple[int, str | bytes]]:
    """The kept ``(offset, data)`` of a history channel with offset above ``since``, oldest first.

    At most ``limit`` of them (the oldest); ``data`` is str for text, bytes for binary.
    """

def recover(target: int | list[int] | tuple[int, ...], channel: _Name, since: tuple[str, int]) -> bool:
    """Subscribe ``target`` to ``channel`` and deliver what it missed since ``(epoch, offset)``.

    Atomic with live sends: every message after ``since`` arrives once, in offset order.
    False (nothing from history delivered, still subscribed) when something was missed
    that is no longer kept.
    """

def track(target: int, channel: _Name, member: str, info: _Name | None = None) -> bool:
    """Track socket ``target`` in ``channel`` as ``member`` with ``info``; True if ``member`` became present.

    A socket is tracked as one member per channel: tracking it again replaces the member
    and info. Raises ValueError when ``target`` is not an open connection or live virtual
    socket (of this node, in a cluster), or ``member`` is empty. In a cluster it waits for
    Redis, which decides whether the member became present on any node.
    """

def untrack(target: int, channel: _Name) -> bool:
    """Untrack socket ``target`` from ``channel``; True if its member left (its last socket there)."""

def presence(channel: _Name) -> dict[str, str | bytes | None]:
    """The members present in ``channel``, each with the info of its latest ``track``.

    In a cluster: on every node, read from Redis (ConnectionError after 3 s without an answer).
    """

def presence_count(channel: _Name) -> int:
    """How many members are present in ``channel`` (in a cluster: on every node, from Redis)."""

def resolve_open(socket_id: int, accept: bool, status: int) -> bool:
    """Deliver ``handle_open``'s verdict; False if the upgrade no longer waits."""

def join_cluster(url: str) -> int:
    """Join the cluster sharing the Redis server at ``url``; return this node's id."""

def leave_cluster() -> None:
    """Leave the cluster, if in one."""

def log_fd() -> int | None:
    """The descriptor that turns readable when engine log records wait (None: not ours)."""

def take_log_records() -> tuple[list[tuple[str, int, str, str | None, int]], int]:
    """Take the queued engine log records ``(logger, level, message, file, line)`` and the dropped count."""

def counters() -> dict[str, Any]:
    """The engine's counters (``stats()`` without the worker list)."""

@final
class WorkerQueue:
    """One worker thread's queue of events."""

    @property
    def id(self) -> int: ...
    @property
    def connections(self) -> int: ...
    @property
    def queue_depth(self) -> int: ...
    def fileno(self) -> int:
        """The descriptor that becomes readable when events wait."""
    @overload
    def drain(self, max: int | None = None, timed: Literal[False] = False) -> list[tuple[int, int, Any]]:
        """Take the waiting events (at most ``max``) as ``(kind, socket_id, payload)``.

        When more wait, the descriptor stays readable. They count against their
        connections' backlogs until :meth:`settle` (or the next drain).
        """
    @overload
    def drain(self, max: int | None, timed: Literal[True]) -> list[tuple[int, int, tuple[Any, int]]]:
        """Like the above, each payload as ``(payload, read_at)``.

        ``read_at`` is when the event was read, as :meth:`HandlerTimings.call` takes it.
        """
    @overload
    def drain(self, max: int | None, timed: bool) -> list[tuple[int, int, Any]]:
        """Timed or not, as ``timed`` says."""
    @overload
    def drain_turn(
        self, max: int | None = None, timed: Literal[False] = False, fill: int = 0
    ) -> list[tuple[int, int, Any]]:
        """Take the oldest turn: one waiting event of each connection that has any (at most ``max``).

        Then the next turns while fewer than ``fill`` events are taken. Settles the events
        drained before, as :meth:`drain` does.
        """
    @overload
    def drain_turn(
        self, max: int | None, timed: Literal[True], fill: int = 0
    ) -> list[tuple[int, int, tuple[Any, int]]]:
        """Like the above, each payload as ``(payload, read_at)``."""
    @overload
    def drain_turn(self, max: int | None, timed: bool, fill: int = 0) -> list[tuple[int, int, Any]]:
        """Timed or not, as ``timed`` says."""
    def settle(self) -> None:
        """The events last drained have run or are held: they stop counting."""
    def hold(self, socket_id: int) -> None:
        """An event of ``socket_id`` waits or is awaited: it counts until ``release``."""
    def release(self, socket_id: int) -> None:
        """A held event's handler finished."""
    def probe(self) -> None:
        """Wake an idle worker as if an event waited (hang detection)."""
    def stalled_for(self) -> float:
        """Seconds the oldest waiting event has waited."""

@final
class Server:
    """A bound server; ``serve()`` starts accepting."""

    def __new__(
        cls,
        bind: list[str],
        *,
        max_message_size: int,
        max_backpressure: int,
        ping_interval: float,
        ping_timeout: float,
        open_timeout: float,
        max_pending_upgrades: int,
        compression: bool,
        max_message_rate: float | None = None,
        max_connections: int | None = None,
        max_connections_per_ip: int | None = None,
        io_threads: int | None = None,
        static_dir: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        history: list[tuple[bytes, int, float, bool]] | None = None,
    ) -> Server: ...
    def addresses(self) -> list[tuple[str, int]]: ...
    def add_worker(self) -> WorkerQueue: ...
    def retire_worker(self, worker_id: int) -> int: ...
    def serve(self, *, handle_open: bool, handle_text: bool, handle_binary: bool) -> None: ...
    def shutdown(self, timeout: float) -> None: ...

@disjoint_base
class Cluster:
    """A connection to a cluster's Redis server from a process that is not a WarpSocket server.

    ``warpsocket.Cluster`` subclasses it (the ``history`` option checked, the context manager).
    """

    def __new__(cls, url: str, history: list[tuple[bytes, int, float, bool]] | None = None) -> Self: ...
    def send(self, target: _Target, data: _Name) -> int:
        """Hand ``data`` for ``target`` to Redis; return the number of messages handed."""
    def subscribe(self, target: _Target, channel: _Name, delta: int = 1) -> list[int]:
        """Forward the subscription to the sockets' nodes (a channel: to every node); return []."""
    def unsubscribe(self, target: _Target, channel: _Name, delta: int = 1) -> list[int]:
        """``subscribe(target, channel, -delta)``."""
    def close(self, socket_id: int, code: int = 1000, reason: str = "") -> bool:
        """Forward a close to the socket's node; True when handed to Redis."""
    def has_subscriptions(self, channel: _Name) -> bool:
        """True if any node has subscribers for ``channel`` (False while Redis is unreachable)."""
    def get_key(self, key: _Name) -> bytes | None:
        """Return the value stored under ``key``, or None."""
    def set_key(self, key: _Name, value: _Name | None = None) -> bytes | None:
        """Store ``value`` (None deletes); return the previous value."""
    def set_key_if(
        self, key: _Name, new_value: _Name | None = None, check_value: _Name | None = None
    ) -> bool:
        """Compare-and-set: store ``new_value`` if the current value equals ``check_value``."""
    def position(self, channel: _Name) -> tuple[str, int]:
        """``(epoch, offset)`` of a history channel's last message (offset 0: none yet)."""
    def history(
        self, channel: _Name, since: int = 0, limit: int | None = None
    ) -> list[tuple[int, str | bytes]]:
        """The kept ``(offset, data)`` of a history channel with offset above ``since``, oldest first."""
    def presence(self, channel: _Name) -> dict[str, str | bytes | None]:
        """The members present in ``channel`` across the cluster, each with its latest info."""
    def presence_count(self, channel: _Name) -> int:
        """How many members are present in ``channel`` across the cluster."""
    @property
    def disconnected(self) -> bool:
        """True once :meth:`disconnect` was called."""
    def disconnect(self) -> None:
        """Close the Redis connections; every other method raises RuntimeError afterwards."""

_Histogram: TypeAlias = tuple[list[list[int]], list[float]]

@final
class HandlerTimings:
    """One worker thread's histograms of its handler calls: queue wait and duration by kind."""

    def __new__(cls, bounds: list[float] | tuple[float, ...]) -> HandlerTimings: ...
    def record(self, kind: int, waited: float, ran: float) -> None:
        """Count one call of handler ``kind`` (see ``HANDLER_KINDS``); one thread only."""
    def call(
        self,
        run: Callable[[int, int, Any], Any],
        on_await: Callable[[int, Any, float, int], Any],
        kind: int,
        socket_id: int,
        timed: tuple[Any, int],
    ) -> Any:
        """Run ``run(kind, socket_id, payload)`` and record its queue wait and duration.

        ``timed`` is a timed drain's ``(payload, read_at)``. For an awaitable result,
        return ``on_await(kind, result, waited, start)``, which records through
        :meth:`finish` once awaited.
        """
    def finish(self, kind: int, waited: float, start: int) -> None:
        """Count an awaited call that :meth:`call` started at ``start``."""
    def snapshot(self) -> tuple[_Histogram, _Histogram]:
        """``(wait, ran)``, each ``(counts, sums)`` per kind; counts per bucket, +Inf last."""
