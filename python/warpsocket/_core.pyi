"""Type stubs for the native module built from crates/warpsocket-py."""

from typing import Any

EVENT_OPEN: int
EVENT_TEXT: int
EVENT_BINARY: int
EVENT_CLOSE: int

def send(target: int | list[int], data: str | bytes | bytearray | memoryview) -> int:
    """Queue ``data`` for every socket in ``target``; return how many it was queued for."""

def close(socket_id: int, code: int = 1000, reason: str = "") -> bool:
    """Start closing a connection; True if an open connection had this id."""

def resolve_open(socket_id: int, accept: bool, status: int) -> bool:
    """Deliver ``handle_open``'s verdict; False if the upgrade no longer waits."""

def counters() -> dict[str, int]:
    """The engine's counters (``stats()`` without the worker list)."""

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
    def drain(self) -> list[tuple[int, int, Any]]:
        """Take every waiting event as ``(kind, socket_id, payload)``."""
    def finished(self, socket_ids: list[int]) -> None:
        """Report that the handlers of these events finished (one id per event)."""
    def stalled_for(self) -> float:
        """Seconds the oldest waiting event has waited."""

class Server:
    """A bound server; ``serve()`` starts accepting."""

    def __init__(
        self,
        bind: list[str],
        *,
        max_message_size: int,
        max_backpressure: int,
        ping_interval: float,
        ping_timeout: float,
        open_timeout: float,
        io_threads: int | None = None,
    ) -> None: ...
    def addresses(self) -> list[tuple[str, int]]: ...
    def add_worker(self) -> WorkerQueue: ...
    def retire_worker(self, worker_id: int) -> bool: ...
    def serve(self, *, handle_open: bool, handle_text: bool, handle_binary: bool) -> None: ...
    def shutdown(self, timeout: float) -> None: ...
