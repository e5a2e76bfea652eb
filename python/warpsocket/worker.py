"""Worker threads: a module instance, an asyncio loop, and in-order handlers.

Each worker thread loads its own instance of the worker module, runs its own
asyncio loop, and runs the handlers of its connections in order. The core
signals a descriptor when events wait; the loop takes them turn by turn (one
waiting event of each connection per turn, so a flooding connection slows only
itself), up to ``DRAIN_BATCH`` (the core's ``_core.DRAIN_BATCH``) per wakeup.
A connection whose handler is awaiting keeps a backlog, so its events still
run one after another while other connections go on.

With metrics on, each handler call's queue wait (from the read of its frame to
its start) and duration (for an async handler, until it was awaited) go into
the worker's own ``_core.HandlerTimings``. There is one drain loop either way:
what differs is bound when the worker starts (the handler call it makes, and
whether the drain reports read times), so with metrics off the loop does
nothing per event that it would not do without metrics.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import importlib.util
import inspect
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from types import ModuleType
from typing import Any

from . import _core
from .codes import CloseCode, HandlerKind, RefusalStatus
from .config import Options
from .sequencer import Sequencer

logger = logging.getLogger("warpsocket")

# Plain ints in the hot loop: comparing an event's int kind with them is the
# cheapest comparison there is.
OPEN, TEXT, BINARY, CLOSE, PRESENCE = (int(kind) for kind in HandlerKind)

# Events taken per drain (the core keeps room for this many between drains).
# When thousands of connections send at once, the worker converts and runs them
# in slices of this size instead of holding them all as Python objects; the
# descriptor stays readable while more wait.
DRAIN_BATCH = _core.DRAIN_BATCH

HANDLER_NAMES = (
    "handle_start",
    "handle_open",
    "handle_text_message",
    "handle_binary_message",
    "handle_close",
    "handle_presence",
)

# A worker whose handlers are quick takes the turns after the oldest with it, as many
# events as its handlers ran in this long on the batch before (at most FILL_MAX): a
# flooding connection's one-event turns then cost one drain between them, not one each,
# and a connection arriving meanwhile waits behind at most this long of them.
FILL_SECONDS = 100e-6
FILL_MAX = 64

# Module execution temporarily registers the module in sys.modules, and a worker file's
# folder goes on sys.path: one thread at a time.
_import_lock = threading.Lock()

if sys.version_info >= (3, 11):

    async def _with_timeout(awaitable: Awaitable[Any], seconds: float) -> Any:
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover - Python 3.10

    async def _with_timeout(awaitable: Awaitable[Any], seconds: float) -> Any:
        return await asyncio.wait_for(awaitable, seconds)


def load_worker_module(worker: str) -> ModuleType:
    """Execute a fresh instance of the worker module (a file path or a module name).

    Each worker thread gets its own module object with its own globals. Raises
    ImportError naming the worker when it cannot be found or executed.
    """
    is_path = worker.endswith(".py") or os.sep in worker or "/" in worker
    try:
        if is_path:
            path = os.path.abspath(worker)
            if not os.path.isfile(path):
                raise ImportError(f"worker file {worker!r} not found")
            # Like running a script: siblings of the worker file are importable. Checked
            # and added under the lock: workers load at the same time (in parallel on a
            # free-threaded build), and each would otherwise add it again.
            directory = os.path.dirname(path)
            with _import_lock:
                if directory not in sys.path:
                    sys.path.insert(0, directory)
            name = os.path.splitext(os.path.basename(path))[0]
            spec = importlib.util.spec_from_file_location(name, path)
        else:
            spec = importlib.util.find_spec(worker)
        if spec is None or spec.loader is None:
            raise ImportError(f"worker module {worker!r} not found")
        module = importlib.util.module_from_spec(spec)
        with _import_lock:
            previous = sys.modules.get(spec.name)
            sys.modules[spec.name] = module
            try:
                spec.loader.exec_module(module)
            finally:
                if previous is None:
                    sys.modules.pop(spec.name, None)
                else:
                    sys.modules[spec.name] = previous
        return module
    except ImportError as exc:
        if worker in str(exc):
            raise
        raise ImportError(f"cannot import worker {worker!r}: {exc}") from exc
    except Exception as exc:
        raise ImportError(f"cannot import worker {worker!r}: {type(exc).__name__}: {exc}") from exc


class WorkerRetired(BaseException):
    """Raised inside a worker thread that was retired as hung.

    A ``BaseException`` so that ``except Exception`` in a handler does not swallow it.
    """


class Worker(threading.Thread):
    """One worker thread with its module instance and event loop."""

    def __init__(
        self,
        index: int,
        options: Options,
        queue: _core.WorkerQueue,
        inherited: tuple[_core.WorkerQueue, ...] = (),
        *,
        timings: _core.HandlerTimings | None = None,
    ) -> None:
        super().__init__(name=f"warpsocket-worker-{index}", daemon=True)
        self.options = options
        self.queue = queue
        # Queues of retired workers whose connections' handle_close runs here.
        self.inherited = list(inherited)
        self.retired = False
        # Events taken up from the queue, for the supervisor: a worker going
        # through a long batch of slow handlers is busy, not hung.
        self.picked_up = 0
        # Events to take with a turn (see _on_events), from the last batch's pace.
        self._fill = 0
        self.ready = threading.Event()
        self.startup_error: BaseException | None = None
        self.handlers: dict[str, Callable[..., Any] | None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sequencer = Sequencer(queue.hold, queue.release)
        self._tasks: set[asyncio.Task[None]] = set()
        self._timeout = options.handler_timeout
        # Written by this thread only (see HandlerTimings); None: metrics are off.
        self._timings = timings
        # Bound once when the thread starts (see run()), so the drain loop never
        # asks whether metrics are on. With metrics off, events are
        # (kind, sid, payload) and a handler call is _run; with metrics on, the
        # drain is timed, so each payload is (payload, read_at), and a handler
        # call is HandlerTimings.call, which runs _run and records its timings.
        self._call: Callable[[int, int, Any], Awaitable[Any] | None] = self._run
        self._timed = False

    # -- thread body ---------------------------------------------------------

    def run(self) -> None:
        """Load the module, run ``handle_start``, then serve events until stopped."""
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            module = load_worker_module(self.options.worker)
            self.handlers = {name: _handler(module, name) for name in HANDLER_NAMES}
            start = self.handlers["handle_start"]
            if start is not None:
                try:
                    result = start(self.options.worker_arg)
                    if inspect.isawaitable(result):
                        loop.run_until_complete(result)
                except Exception as exc:
                    raise RuntimeError(
                        f"handle_start of worker {self.options.worker!r} raised {type(exc).__name__}: {exc}"
                    ) from exc
        except BaseException as exc:  # reported to start(), which raises it
            self.startup_error = exc
            self.ready.set()
            loop.close()
            return
        self._on_open = self.handlers["handle_open"]
        self._on_text = self.handlers["handle_text_message"]
        self._on_binary = self.handlers["handle_binary_message"]
        self._on_close = self.handlers["handle_close"]
        self._on_presence = self.handlers["handle_presence"]
        if self._timings is not None:
            self._call = functools.partial(self._timings.call, self._run, self._timed_await)
            self._timed = True
        loop.add_reader(self.queue.fileno(), self._on_events)
        for orphaned in self.inherited:
            loop.add_reader(orphaned.fileno(), self._on_inherited_events, orphaned)
            self._on_inherited_events(orphaned)
        self.ready.set()
        try:
            loop.run_forever()
        finally:
            loop.remove_reader(self.queue.fileno())
            for orphaned in self.inherited:
                loop.remove_reader(orphaned.fileno())
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
            loop.close()

    def finish(self, deadline: float) -> None:
        """Ask the thread to run what is queued and in flight (until ``deadline``), then end."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(lambda: loop.create_task(self._finish(deadline)))
        except RuntimeError:  # the loop closed meanwhile
            pass

    def retire(self) -> str:
        """Mark this (hung) worker retired and try to end its thread.

        Returns the thread's current Python stack, for the log. The loop is asked to
        stop and :class:`WorkerRetired` is raised inside the thread, which ends a
        pure-Python loop at once; a thread blocked in a C call (``time.sleep``, a
        socket read) only sees it when that call returns.
        """
        self.retired = True
        frame = sys._current_frames().get(self.ident or -1)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(not running)\n"
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:  # closed meanwhile
                pass
        if self.ident is not None and self.is_alive():
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(self.ident), ctypes.py_object(WorkerRetired)
            )
        return stack

    async def _finish(self, deadline: float) -> None:
        self._on_events(None)
        while self._tasks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.wait(set(self._tasks), timeout=remaining)
            self._on_events(None)
        assert self._loop is not None
        self._loop.stop()

    # -- events --------------------------------------------------------------

    def _on_events(self, batch: int | None = DRAIN_BATCH) -> None:
        """Run the waiting events (up to ``batch``): sync handlers now, async ones as tasks.

        Taken one turn at a time, each run before the next is taken, so that an event
        of one connection waits behind at most one of each other connection (a turn
        taken whole would hold all of a flooding connection's backlog); with quick
        handlers, a few turns at once, up to ``FILL_SECONDS`` of them. Then the loop
        gets its turn (async handlers' tasks) before more are taken.
        Drained events count as handled in the core once settled, after their turn;
        the sequencer holds one that has to wait behind an awaited handler, or that
        starts one, until done, so a connection's backlog stays bounded (the core
        stops reading it). With metrics on, an event that waits in the sequencer
        carries its read time with it in its payload.
        """
        if self.retired:
            return
        sequencer = self._sequencer
        tracked, arrive, ran = sequencer.tracked, sequencer.arrive, sequencer.ran
        call = self._call
        queue = self.queue
        drain_turn, timed = queue.drain_turn, self._timed
        clock = time.perf_counter
        left = batch
        fill = self._fill
        try:
            while left is None or left > 0:
                began = clock()
                # Settles the turn before.
                events = drain_turn(left, timed, fill)
                if not events:
                    break
                if left is not None:
                    left -= len(events)
                for kind, sid, payload in events:
                    self.picked_up += 1
                    # Most apps have no connection waiting on an async handler: skip the calls.
                    if tracked and not arrive(kind, sid, payload):
                        continue
                    pending = call(kind, sid, payload)
                    if pending is not None:
                        ran(kind, sid, True)
                        self._spawn(self._drive(sid, kind, pending))
                    elif tracked:
                        ran(kind, sid, False)
                took = clock() - began
                fill = min(FILL_MAX, int(FILL_SECONDS * len(events) / took)) if took > 0 else FILL_MAX
        finally:
            self._fill = fill
            queue.settle()

    async def _timed_await(self, kind: int, pending: Awaitable[Any], waited: float, start: int) -> Any:
        """Await the handler that ``HandlerTimings.call`` started, then record its timings.

        Recorded however it ended (timeout included); ``start`` is on the core's clock.
        """
        try:
            return await pending
        finally:
            assert self._timings is not None  # only bound with metrics on
            self._timings.finish(kind, waited, start)

    def _on_inherited_events(self, orphaned: _core.WorkerQueue) -> None:
        """Run ``handle_close`` and ``handle_presence`` for a retired worker's connections.

        Those connections were closed with 1011 when the worker was retired, so only
        their close events and the presence changes they cause matter; their messages
        are dropped. Stops watching the queue once all are gone.
        """
        done = orphaned.connections == 0
        for kind, sid, payload in orphaned.drain():
            if kind == CLOSE or kind == PRESENCE:
                pending = self._run(kind, sid, payload)
                if pending is not None:
                    self._spawn(self._await(sid, kind, pending))
        orphaned.settle()
        # Every close event was queued before the count reached 0 (see the core),
        # so once it was 0 before this drain, nothing more can come.
        if done and self._loop is not None:
            self._loop.remove_reader(orphaned.fileno())
            self.inherited.remove(orphaned)

    def _run(self, kind: int, sid: int, payload: Any) -> Awaitable[Any] | None:
        """Call the handler for one event. Returns its awaitable if it has to be awaited."""
        try:
            if kind == TEXT:
                result = self._on_text(payload, sid)  # type: ignore[misc]
            elif kind == BINARY:
                result = self._on_binary(payload, sid)  # type: ignore[misc]
            elif kind == CLOSE:
                if self._on_close is None:
                    return None
                result = self._on_close(sid)
            elif kind == PRESENCE:
                if self._on_presence is None:
                    return None
                channel, member, joined = payload
                result = self._on_presence(channel, member, joined)
            else:
                return self._open(sid, payload)
        except Exception:
            self._failed(sid, kind)
            return None
        if result is not None and inspect.isawaitable(result):
            return result
        return None

    def _open(self, sid: int, payload: tuple[str, dict[str, str]]) -> Awaitable[Any] | None:
        ip, headers = payload
        try:
            result = self._on_open(sid, ip, headers)  # type: ignore[misc]
        except Exception:
            self._refuse(sid, "raised", raised=True)
            return None
        if result is not None and inspect.isawaitable(result):
            return result
        self._verdict(sid, result)
        return None

    def _verdict(self, sid: int, accepted: Any) -> None:
        if not accepted:
            _core.resolve_open(sid, False, RefusalStatus.FORBIDDEN)
            self._sequencer.forget(sid)
        elif not _core.resolve_open(sid, True, 0):
            # The client left while handle_open ran: there will be no close event.
            self._sequencer.forget(sid)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drive(self, sid: int, kind: int, pending: Awaitable[Any]) -> None:
        """Await one connection's handler, then run what waited behind it, in order."""
        sequencer = self._sequencer
        call = self._call
        while True:
            await self._await(sid, kind, pending)
            sequencer.finished(kind, sid)
            while True:
                event = sequencer.next(sid)
                if event is None:
                    return
                kind, payload = event
                next_pending = call(kind, sid, payload)
                sequencer.ran(kind, sid, next_pending is not None)
                if next_pending is not None:
                    pending = next_pending
                    break

    async def _await(self, sid: int, kind: int, pending: Awaitable[Any]) -> None:
        try:
            result = await _with_timeout(pending, self._timeout)
        except TimeoutError:
            self._timed_out(sid, kind)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            if kind == OPEN:
                self._refuse(sid, "raised", raised=True)
            else:
                self._failed(sid, kind)
            return
        if kind == OPEN:
            self._verdict(sid, result)

    def _timed_out(self, sid: int, kind: int) -> None:
        if kind == OPEN:
            self._refuse(sid, f"timed out after {self._timeout:.1f} s", raised=False)
            return
        if kind == PRESENCE:
            # The connection is not to blame for a presence change's handler.
            logger.error("%s for socket %d timed out after %.1f s", _EVENT_HANDLER[kind], sid, self._timeout)
            return
        logger.error(
            "%s for socket %d timed out after %.1f s; closing with %d",
            _EVENT_HANDLER[kind],
            sid,
            self._timeout,
            CloseCode.INTERNAL,
        )
        if kind != CLOSE:
            self._sequencer.fail(sid)
            _core.close(sid, CloseCode.INTERNAL, "handler timed out")

    def _refuse(self, sid: int, what: str, *, raised: bool) -> None:
        """``handle_open`` raised or timed out: refuse the upgrade with 500.

        Logged with the traceback when it ``raised`` (call it in the ``except``
        block then). The sequencer forgets ``sid``: a refused connection has no
        more events.
        """
        status = RefusalStatus.INTERNAL_ERROR
        log = logger.exception if raised else logger.error
        log("handle_open for socket %d %s; refusing with %d", sid, what, status)
        _core.resolve_open(sid, False, status)
        self._sequencer.forget(sid)

    def _failed(self, sid: int, kind: int) -> None:
        """A handler raised: log the traceback, close with 1011, drop later messages.

        Only logged for ``handle_close`` (the connection is gone) and ``handle_presence``
        (the connection is not to blame).
        """
        what = _EVENT_HANDLER[kind]
        if kind == CLOSE or kind == PRESENCE:
            logger.exception("%s for socket %d raised", what, sid)
            return
        logger.exception("%s for socket %d raised; closing with %d", what, sid, CloseCode.INTERNAL)
        self._sequencer.fail(sid)
        _core.close(sid, CloseCode.INTERNAL, "handler error")


_EVENT_HANDLER = {
    OPEN: "handle_open",
    TEXT: "handle_text_message",
    BINARY: "handle_binary_message",
    CLOSE: "handle_close",
    PRESENCE: "handle_presence",
}


def _handler(module: ModuleType, name: str) -> Callable[..., Any] | None:
    value: object = getattr(module, name, None)
    if value is None:
        return None
    if not callable(value):
        raise TypeError(f"{name} in the worker module must be callable")
    return value
