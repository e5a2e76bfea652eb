"""Per-connection event order, without threads or I/O.

A worker runs each connection's handlers one after another: ``handle_open``, the
messages in arrival order, then ``handle_close``. While an async handler of a
connection is awaited, that connection's next events wait in a backlog (other
connections go on); once a handler raised or timed out, the connection's later
messages are dropped and only its close still runs. The presence changes a
connection causes (``handle_presence``) are never dropped, and its close may be
followed by some: those of the close itself.

:class:`Sequencer` decides, for every event, whether it runs now, waits or is
dropped, and which waiting event runs when an awaited handler ends. It calls no
handler and awaits nothing: the worker asks it and does what it says, and tests
feed it events directly. Every event that waits or is awaited is *held* in the
core's queue (it counts in ``queue_depth``, and the core slows the connection's
reads) until released; the sequencer makes the hold and release calls, so that
every hold is released exactly once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from .codes import HandlerKind

# Plain ints: compared with each event's int kind.
EVENT_CLOSE = int(HandlerKind.CLOSE)
EVENT_PRESENCE = int(HandlerKind.PRESENCE)


class _Connection:
    """A connection's state, kept only while a handler is awaited or after a failure."""

    __slots__ = ("backlog", "busy", "failed")

    def __init__(self) -> None:
        self.backlog: deque[tuple[int, Any]] = deque()
        self.busy = False
        self.failed = False


class Sequencer:
    """Orders the events of one worker's connections (see the module docstring).

    The worker calls, per drained event, :meth:`arrive`; when it says to run the
    event, the worker calls its handler, then :meth:`ran`. When the worker has
    awaited a handler, it calls :meth:`finished`, then runs what :meth:`next`
    returns (calling :meth:`ran` for each) until it returns None.

    :attr:`tracked` is empty while no connection is awaited, waiting or failed:
    then every event runs at once and :meth:`ran` of a handler that returned no
    awaitable has nothing to do, so the worker's hot loop may skip both calls.
    """

    __slots__ = ("_conns", "_hold", "_release", "tracked")

    def __init__(self, hold: Callable[[int], None], release: Callable[[int], None]) -> None:
        self._conns: dict[int, _Connection] = {}
        #: The connections with state (read it, never change it); empty in the common case.
        self.tracked: Mapping[int, object] = self._conns
        self._hold = hold
        self._release = release

    def arrive(self, kind: int, sid: int, payload: Any) -> bool:
        """A drained event: True if its handler is to run now.

        False if it waits behind an awaited handler (it is held, and :meth:`next`
        returns it later) or is dropped (a message after a failure).
        """
        conn = self._conns.get(sid)
        if conn is None:
            return True
        if conn.busy:
            conn.backlog.append((kind, payload))
            self._hold(sid)
            return False
        return not conn.failed or kind == EVENT_CLOSE or kind == EVENT_PRESENCE

    def ran(self, kind: int, sid: int, awaiting: bool) -> None:
        """The handler of an event from :meth:`arrive` or :meth:`next` returned.

        ``awaiting``: it returned an awaitable, which the worker now awaits before
        it calls :meth:`finished`.
        """
        conns = self._conns
        conn = conns.get(sid)
        from_backlog = conn is not None and conn.busy
        if awaiting:
            if conn is None:
                conn = conns[sid] = _Connection()
            if not from_backlog:
                conn.busy = True
                self._hold(sid)
            return
        if from_backlog:
            self._release(sid)
        if kind == EVENT_CLOSE:
            self._closed(sid, conn if from_backlog else None)

    def finished(self, kind: int, sid: int) -> None:
        """The awaited handler of ``sid`` ended (returned, raised or timed out)."""
        self._release(sid)
        if kind == EVENT_CLOSE:
            self._closed(sid, self._conns.get(sid))

    def _closed(self, sid: int, busy: _Connection | None) -> None:
        """``handle_close`` of ``sid`` ran; ``busy``: its state, while it is being driven.

        A driven connection's backlog can only hold presence changes after its close:
        they still run (``next`` returns them, then forgets it). Otherwise nothing of it
        is left to keep.
        """
        if busy is None:
            self._conns.pop(sid, None)
        else:
            busy.failed = False

    def next(self, sid: int) -> tuple[int, Any] | None:
        """The next waiting event of ``sid`` to run, as ``(kind, payload)``; None when none waits.

        Call it after :meth:`finished`, and after :meth:`ran` said its event ran
        without awaiting; messages waiting after a failure are dropped here.
        """
        conn = self._conns.get(sid)
        if conn is None or not conn.busy:
            return None
        backlog = conn.backlog
        while backlog:
            kind, payload = backlog.popleft()
            if conn.failed and kind != EVENT_CLOSE and kind != EVENT_PRESENCE:
                self._release(sid)
                continue
            return kind, payload
        conn.busy = False
        if not conn.failed:
            del self._conns[sid]
        return None

    def fail(self, sid: int) -> None:
        """A message handler of ``sid`` raised or timed out: drop its later messages."""
        conn = self._conns.get(sid)
        if conn is None:
            conn = self._conns[sid] = _Connection()
        conn.failed = True

    def forget(self, sid: int) -> None:
        """``sid`` will have no more events (its upgrade was refused or abandoned).

        An awaited handler of ``sid`` still ends with :meth:`finished`.
        """
        conn = self._conns.pop(sid, None)
        if conn is not None:
            for _ in conn.backlog:
                self._release(sid)
