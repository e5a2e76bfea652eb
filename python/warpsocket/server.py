"""Starting, running and stopping a server: the native listener plus the worker threads."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, cast

from . import _core, logbridge
from .addresses import format_address
from .config import Options, check_seconds, takes_options
from .stats import Stats, WorkerStats
from .supervisor import Supervisor
from .worker import Worker

if TYPE_CHECKING:
    # Imported when metrics are on: prometheus_client brings http.client, email,
    # wsgiref and urllib with it, ~3 MiB of resident memory that a server without
    # metrics has no use for (docs/benchmarks.md, "Issue 29: memory under load").
    from .metrics import MetricsServer

logger = logging.getLogger("warpsocket")

# One server per process: the engine's sockets and channels are process-wide.
_state_lock = threading.Lock()
_running: Server | None = None


class Server:
    """A running WarpSocket server, returned by :func:`start`.

    Use it as a context manager, or call :meth:`stop` yourself.
    """

    def __init__(
        self,
        options: Options,
        core: _core.Server,
        workers: list[Worker],
        metrics: MetricsServer | None,
    ) -> None:
        self.options = options
        self._core = core
        self._metrics = metrics
        # Live workers; retired (hung) ones move to _retired. Guarded by _workers_lock.
        self._workers = workers
        self._retired: list[Worker] = []
        self._workers_lock = threading.Lock()
        self._next_index = len(workers)
        self._stopped = threading.Event()
        # Set when stop() begins: a retirement in progress stops waiting for its replacement.
        self._stopping = threading.Event()
        self._stop_lock = threading.Lock()
        self.addresses: list[tuple[str, int]] = core.addresses()
        """``(host, port)`` of every bound address, in the order given to ``bind``."""
        self._supervisor = Supervisor(options.hang_timeout, self._live_workers, self._retire)
        self._supervisor.start()
        self._log_pump = logbridge.LogPump()
        self._log_pump.start()

    def _live_workers(self) -> list[Worker]:
        with self._workers_lock:
            return list(self._workers)

    def _retire(self, worker: Worker, stalled: float) -> None:
        """Replace a hung worker: close its connections, interrupt it, start a fresh one."""
        with self._workers_lock:
            if worker not in self._workers:
                return
            self._workers.remove(worker)
            self._retired.append(worker)
            index = self._next_index
            self._next_index += 1
        ended = self._core.retire_worker(worker.queue.id)
        stack = worker.retire()
        logger.error(
            "worker %s left its events waiting for %.1f s (hang_timeout %.1f s): retired, "
            "%d connections closed with 1011; its thread was here:\n%s",
            worker.name,
            stalled,
            self.options.hang_timeout,
            ended,
            stack.rstrip(),
        )
        inherited = (*worker.inherited, worker.queue)
        replacement = Worker(
            index, self.options, self._core.add_worker(), inherited, timings=_timings(self._metrics)
        )
        replacement.start()
        if not self._replacement_ready(replacement):
            # Waiting on would leave the supervisor (and stop(), which waits for it)
            # hanging with the replacement: give it up and go on with one worker fewer.
            if not self._stopping.is_set():
                logger.error(
                    "replacement worker %s did not finish handle_start within %.1f s "
                    "(hang_timeout): given up, serving on with one worker fewer; the "
                    "handle_close of %s's connections will not run",
                    replacement.name,
                    self.options.hang_timeout,
                    worker.name,
                )
            self._give_up(replacement)
            return
        if replacement.startup_error is not None:
            logger.error(
                "replacement worker %s failed to start: %s", replacement.name, replacement.startup_error
            )
            self._core.retire_worker(replacement.queue.id)
            return
        with self._workers_lock:
            self._workers.append(replacement)
        logger.warning("worker %s replaces %s", replacement.name, worker.name)

    def _replacement_ready(self, replacement: Worker) -> bool:
        """Wait up to ``hang_timeout`` for ``replacement``'s ``handle_start``.

        False if it did not finish in time, or stop() began meanwhile.
        """
        deadline = time.monotonic() + self.options.hang_timeout
        while not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if replacement.ready.wait(min(remaining, 0.05)):
                return True
        return False

    def _give_up(self, replacement: Worker) -> None:
        """Take a replacement still in ``handle_start`` out of service; stop() joins it."""
        with self._workers_lock:
            self._retired.append(replacement)
        self._core.retire_worker(replacement.queue.id)
        replacement.retire()

    @property
    def port(self) -> int:
        """The port of the first bound address (handy with ``bind="127.0.0.1:0"``)."""
        return self.addresses[0][1]

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``(host, port)`` serving ``/metrics`` and ``/healthz`` (None without ``metrics_bind``)."""
        return self._metrics.address if self._metrics is not None else None

    @property
    def running(self) -> bool:
        """True until :meth:`stop` has completed."""
        return not self._stopped.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop gracefully (docs/api.md#shutdown), waiting up to ``timeout`` seconds.

        Stops accepting, closes every connection with 1001, lets pending handlers and
        every ``handle_close`` run, ends the worker threads and frees the ports.
        Calling it again (or from several threads) is harmless. A ``timeout`` that is
        not a finite number of seconds raises before anything stops; a negative one is 0.
        """
        seconds = max(check_seconds("timeout", timeout, positive=False), 0.0)
        self._draining()
        with self._stop_lock:
            if self._stopped.is_set():
                return
            deadline = time.monotonic() + seconds
            self._stopping.set()
            self._supervisor.stop()
            self._core.shutdown(seconds)
            # Close events are all queued now; give the workers the rest of the time.
            workers = self._live_workers()
            for worker in workers:
                worker.finish(deadline)
            # One deadline for all: hung threads cost one second in all, not one each.
            join_deadline = deadline + 1.0
            with self._workers_lock:
                retired = list(self._retired)
            for worker in workers + retired:
                worker.join(max(join_deadline - time.monotonic(), 0.0))
                if worker.is_alive():
                    logger.warning("worker thread %s did not finish in time", worker.name)
            if self.options.cluster is not None:
                # After every handle_close: they may still use the shared kv store.
                _core.leave_cluster()
            if self._metrics is not None:
                self._metrics.close()
            self._log_pump.stop()
            _release(self)
            self._stopped.set()
            logger.info("warpsocket stopped")

    def _draining(self) -> None:
        """``/healthz`` answers 503 from now on: load balancers stop sending clients here."""
        if self._metrics is not None:
            self._metrics.set_stopping()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; returns False if ``timeout`` passed first."""
        if timeout is None:
            return self._stopped.wait()
        return self._stopped.wait(check_seconds("timeout", timeout, positive=False))

    def stats_workers(self) -> list[WorkerStats]:
        """Per live worker: ``id``, ``connections``, ``queue_depth``."""
        return [
            {"id": w.queue.id, "connections": w.queue.connections, "queue_depth": w.queue.queue_depth}
            for w in self._live_workers()
        ]

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = ", ".join(f"{h}:{p}" for h, p in self.addresses)
        state = "running" if self.running else "stopped"
        return f"<warpsocket.Server {state} on {where} with {len(self._workers)} workers>"


def _release(server: Server) -> None:
    global _running
    with _state_lock:
        if _running is server:
            _running = None


def stats() -> Stats:
    """Return a snapshot of the server's counters (docs/api.md#stats).

    Keys: ``connections`` (open connections), ``virtual_sockets``, ``channels`` (with
    at least one subscription), ``subscriptions`` (socket/channel pairs), ``keys``,
    ``messages_in``, ``messages_out`` (frames queued to clients), ``bytes_in``,
    ``bytes_out`` (payload bytes, uncompressed), ``backpressure_closes``,
    ``rate_limit_closes`` (connections closed with 1008 for ``max_message_rate``),
    ``connections_refused`` (upgrades refused for ``max_connections``, 503, or
    ``max_connections_per_ip``, 429),
    ``messages_compressed`` (outgoing messages deflated with ``compression=True``: a
    broadcast counts once, however many recipients get it compressed), and ``workers``:
    one dict per live worker with ``id``, ``connections`` and ``queue_depth``.

    Cluster mode adds ``node_id`` (0 outside a cluster), ``cluster_messages_out``
    (messages handed to Redis for other nodes), ``cluster_messages_in`` (received from
    them) and ``cluster_send_failures`` (cross-node sends lost because Redis was
    unreachable); ``keys`` then counts the keys in Redis, -1 while Redis cannot be asked.
    It also adds ``redis_connected``: 1 while the connection to Redis is up, else 0.

    For the metrics (docs/api.md#metrics): ``worker_retirements`` (hung workers retired),
    ``handshakes_refused`` ({HTTP status: upgrade requests answered with it instead of
    101}) and ``closes`` ({close code: close frames the server sent, its own and its
    answers to the client's; 1005 for one without a code}).

    With the ``history`` option (docs/api.md#history): ``history_channels`` (channels
    whose history this process keeps) and ``history_messages`` (messages kept, over
    every channel); both 0 without it.

    With presence (docs/api.md#presence): ``presence_members``, the (channel, member)
    pairs present through this process's sockets.
    """
    running = _running
    workers = running.stats_workers() if running is not None else []
    # The core's dict has every key of Stats but "workers" (crates/warpsocket-py, counters()).
    return cast(Stats, {**_core.counters(), "workers": workers})


@takes_options
def start(options: Options) -> Server:
    """Start a server and return it once every address is bound and every worker is ready.

    ``bind`` is an address (``"127.0.0.1:3000"``, ``"[::1]:3000"``) or a list of them;
    ``worker`` a file path or an importable module name. ``static_dir``: a folder whose
    files answer plain HTTP GET/HEAD requests on the same port (else they get 426).
    ``cluster``: a Redis URL (``"redis://host:6379/0"``) to join a cluster of WarpSocket
    processes sharing that Redis server (docs/api.md#cluster).
    ``tls_cert`` / ``tls_key``: paths of a PEM certificate chain and its private key;
    given both, every address speaks TLS only (``wss://``, ``https://``).
    ``metrics_bind``: an address (``"127.0.0.1:9100"``) serving Prometheus ``/metrics``
    and ``/healthz`` over plain HTTP (docs/api.md#metrics).
    ``history``: ``{channel prefix: History(size, ttl=300.0, stamp=True)}``, the channels
    whose messages get offsets and are kept for :func:`recover` (docs/api.md#history);
    not with ``cluster`` yet (``ValueError``).
    The tunables are keyword-only; the signature shows them with their defaults, and
    docs/api.md#options explains them.

    Raises ``ValueError`` naming ``tls_cert`` or ``tls_key`` when one is given without
    the other or cannot be used, ``OSError`` when an address cannot be bound, ``ConnectionError`` when the
    cluster's Redis server cannot be reached, ``ImportError`` when the worker cannot be
    imported, ``RuntimeError`` when ``handle_start`` raises or a server already
    runs; nothing is left running then.
    """
    return _start(options)


def _start(options: Options) -> Server:
    """Join the cluster if asked, bind and start the workers: ``start()`` after its checks."""
    global _running
    with _state_lock:
        if _running is not None:
            raise RuntimeError("a WarpSocket server is already running in this process")
        # Bound first, the cheapest thing to undo; /healthz says 503 until serving.
        metrics = None
        if options.metrics_bind is not None:
            from .metrics import MetricsServer

            metrics = MetricsServer(options.metrics_bind, stats, serving=False)
        try:
            if options.cluster is not None:
                # Joined first: every socket id handed out carries this node's number.
                node = _core.join_cluster(options.cluster)
                logger.info("joined the cluster at %s as node %d", options.cluster, node)
            try:
                server = _start_joined(options, metrics)
            except BaseException:
                if options.cluster is not None:
                    _core.leave_cluster()
                raise
        except BaseException:
            if metrics is not None:
                metrics.close()
            raise
        _running = server
        if metrics is not None:
            metrics.set_serving()
    where = ", ".join(format_address(h, p) for h, p in server.addresses)
    logger.info("warpsocket listening on %s with %d workers", where, options.threads)
    return server


def _start_joined(options: Options, metrics: MetricsServer | None) -> Server:
    """Bind, start the workers and serve; on failure leave nothing running."""
    core = _core.Server(
        list(options.bind),
        max_message_size=options.max_message_size,
        max_backpressure=options.max_backpressure,
        ping_interval=options.ping_interval,
        ping_timeout=options.ping_timeout,
        open_timeout=options.handler_timeout + options.hang_timeout + 1.0,
        max_pending_upgrades=options.max_pending_upgrades,
        compression=options.compression,
        max_message_rate=options.max_message_rate,
        max_connections=options.max_connections,
        max_connections_per_ip=options.max_connections_per_ip,
        static_dir=options.static_dir,
        tls_cert=options.tls_cert,
        tls_key=options.tls_key,
        history=[
            (prefix.encode() if isinstance(prefix, str) else prefix, rule.size, rule.ttl, rule.stamp)
            for prefix, rule in options.history
        ],
    )
    workers: list[Worker] = []
    try:
        for index in range(options.threads):
            worker_thread = Worker(index, options, core.add_worker(), timings=_timings(metrics))
            workers.append(worker_thread)
            worker_thread.start()
        for worker_thread in workers:
            worker_thread.ready.wait()
        errors = [w.startup_error for w in workers if w.startup_error is not None]
        if errors:
            raise errors[0]
        handlers = workers[0].handlers
        core.serve(
            handle_open=handlers["handle_open"] is not None,
            handle_text=handlers["handle_text_message"] is not None,
            handle_binary=handlers["handle_binary_message"] is not None,
        )
    except BaseException:
        core.shutdown(0.0)
        for worker_thread in workers:
            worker_thread.finish(time.monotonic())
        for worker_thread in workers:
            worker_thread.join(5.0)
        logbridge.flush()
        raise
    return Server(options, core, workers, metrics)


def _timings(metrics: MetricsServer | None) -> _core.HandlerTimings | None:
    """A new worker's handler timings; None (nothing recorded) without metrics."""
    return metrics.worker_timings() if metrics is not None else None


@takes_options
def run(options: Options) -> None:
    """Start a server and block until SIGINT or SIGTERM, then stop gracefully.

    Takes the same arguments as :func:`start`. A second signal during shutdown exits
    the process at once.
    """
    stop_requested = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    server: Server | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop_requested.is_set():
            logger.warning("second signal during shutdown: exiting now")
            os._exit(128 + signum)
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        stop_requested.set()
        if server is not None:
            server._draining()

    # Installed before start(): a signal that arrives while workers start up
    # still stops the server gracefully once it is up.
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        server = _start(options)
        # Short waits so the main thread gets to run signal handlers.
        while not stop_requested.is_set() and server.running:
            stop_requested.wait(0.2)
        server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
