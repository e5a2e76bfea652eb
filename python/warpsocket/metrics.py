"""Prometheus metrics and the health check on their own listener (docs/api.md#metrics).

``MetricsServer(bind, stats)`` serves ``GET /metrics`` (prometheus_client's default
registry, so application metrics registered there appear on the same page) and
``GET /healthz`` (200 while serving: from ``set_serving()``, or from the start, until
``set_stopping()``; else 503) on a thread of its own.

The server's counters are read from ``stats()`` at scrape time by ``StatsCollector``;
nothing is updated per message except the handler timings, which each worker thread
records into its own ``HandlerTimings`` (native atomics, one writer, no lock, no Python
code per call) and which the collector sums at scrape time.

The caller passes the ``stats`` callable, which keeps this module testable without a
running server.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ._core import STATS_FIELDS, HandlerTimings
from .addresses import format_address, parse_bind
from .codes import HandlerKind

logger = logging.getLogger("warpsocket")

#: Upper bounds (seconds) of the histogram buckets. Python handlers of a fast server
#: take tens of microseconds, a slow one (database, network) up to seconds; the
#: Prometheus default buckets start at 5 ms and would put every fast handler in one.
BUCKETS: tuple[float, ...] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BUCKET_LABELS = tuple(floatToGoString(b) for b in BUCKETS) + ("+Inf",)  # type: ignore[no-untyped-call]

# The keys of stats() (all but "workers") with how each is exposed, from the engine's
# one table: a counter becomes ``warpsocket_<key>_total`` (labelled by code when its
# value is a dict), a gauge ``warpsocket_<key>``.
_COUNTER_KEYS = frozenset(key for key, kind, label, _ in STATS_FIELDS if kind == "counter" and label is None)
# stats() dicts of counters by one label: key -> label name.
_LABELLED_COUNTERS = {key: label for key, _, label, _ in STATS_FIELDS if label is not None}
_HELP = {key: help_text for key, _, _, help_text in STATS_FIELDS}


class StatsCollector(Collector):
    """Turns a ``stats()`` snapshot and the workers' timings into metric families.

    ``stats`` returns a mapping with the keys of docs/api.md#stats and optionally
    ``worker_retirements`` (int), ``handshakes_refused`` ({status: n}), ``closes``
    ({code: n}) and the cluster keys ``node_id``, ``redis_connected``,
    ``cluster_messages_in``, ``cluster_messages_out``, ``cluster_send_failures``.
    Ints become gauges, or counters for the keys that only grow; unknown int keys
    become gauges too, so a key added to ``stats()`` shows up without a change here.
    """

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self._stats = stats
        self._timings: list[HandlerTimings] = []
        # Guards the list only: taken when a worker starts and once per scrape.
        self._timings_lock = threading.Lock()

    def worker_timings(self) -> HandlerTimings:
        """Return new timings for one worker thread to record into.

        They stay summed into the histograms after the worker ends (or is retired),
        so the histograms never go down while this collector lives.
        """
        timings = HandlerTimings(BUCKETS)
        with self._timings_lock:
            self._timings.append(timings)
        return timings

    def describe(self) -> Iterable[Metric]:
        """The families this collector always or usually yields (for duplicate checks)."""
        families: list[Metric] = []
        for key, kind, label, help_text in STATS_FIELDS:
            if kind == "counter":
                labels = [label] if label is not None else None
                families.append(CounterMetricFamily(f"warpsocket_{key}", help_text, labels=labels))
            else:
                families.append(GaugeMetricFamily(f"warpsocket_{key}", help_text))
        families += self._worker_families()
        families += self._histograms([])
        return families

    def collect(self) -> Iterator[Metric]:
        """Read ``stats()`` and the timings; yield one family per metric."""
        stats = self._stats()
        for key, value in stats.items():
            if key == "workers":
                yield from self._worker_families(value)
            elif key in _LABELLED_COUNTERS:
                family = CounterMetricFamily(
                    f"warpsocket_{key}", _HELP[key], labels=[_LABELLED_COUNTERS[key]]
                )
                for label, count in sorted(value.items()):
                    family.add_metric([str(label)], count)
                yield family
            elif isinstance(value, int):
                if key == "keys" and value < 0:
                    continue  # Redis cannot be asked: unknown, which is not 0
                name, help_text = f"warpsocket_{key}", _HELP.get(key, f"stats()[{key!r}]")
                if key in _COUNTER_KEYS:
                    yield CounterMetricFamily(name, help_text, value=value)
                else:
                    yield GaugeMetricFamily(name, help_text, value=int(value))
        with self._timings_lock:
            timings = list(self._timings)
        yield from self._histograms(timings)

    @staticmethod
    def _worker_families(workers: Iterable[Mapping[str, int]] = ()) -> list[Metric]:
        connections = GaugeMetricFamily(
            "warpsocket_worker_connections", "Open connections per worker.", labels=["worker"]
        )
        depth = GaugeMetricFamily(
            "warpsocket_worker_queue_depth", "Events waiting for each worker.", labels=["worker"]
        )
        for worker in workers:
            connections.add_metric([str(worker["id"])], worker["connections"])
            depth.add_metric([str(worker["id"])], worker["queue_depth"])
        return [connections, depth]

    @staticmethod
    def _histograms(timings: list[HandlerTimings]) -> list[Metric]:
        duration = HistogramMetricFamily(
            "warpsocket_handler_duration_seconds",
            "Time a handler ran, by handler kind.",
            labels=["handler"],
        )
        wait = HistogramMetricFamily(
            "warpsocket_queue_wait_seconds",
            "Time from reading a frame (or accepting the upgrade) to its handler's start.",
            labels=["handler"],
        )
        snapshots = [t.snapshot() for t in timings]
        for family, which in ((wait, 0), (duration, 1)):
            counts = [snapshot[which][0] for snapshot in snapshots]
            sums = [snapshot[which][1] for snapshot in snapshots]
            for kind in HandlerKind:
                name = kind.name.lower()
                cumulative, buckets = 0, []
                for i, label in enumerate(_BUCKET_LABELS):
                    cumulative += sum(worker[kind][i] for worker in counts)
                    buckets.append((label, cumulative))
                family.add_metric([name], buckets, sum(worker[kind] for worker in sums))
        return [duration, wait]


class _RequestHandler(WSGIRequestHandler):
    # A client that connects and stalls costs a thread for this long at most.
    timeout = 5.0

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics %s: " + format, self.address_string(), *args)


class _HTTPServer(WSGIServer):
    """wsgiref's server with a named thread per request, joined on close."""

    def __init__(self, host: str, port: int, app: Callable[..., Iterable[bytes]]) -> None:
        # socket.create_server would do the same lookup; the family must be known
        # before TCPServer creates the socket.
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self.address_family = family
        self._requests: set[threading.Thread] = set()
        self._requests_lock = threading.Lock()
        # getaddrinfo's type allows AF_UNIX addresses; a TCP lookup gives (host, port[, ...]).
        super().__init__(cast("tuple[str, int] | tuple[str, int, int, int]", sockaddr), _RequestHandler)
        self.set_app(app)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can
        # hang on a machine without DNS; the name is only used for SERVER_NAME.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_one,
            args=(request, client_address),
            name="warpsocket-metrics-http",
            daemon=True,
        )
        with self._requests_lock:
            self._requests.add(thread)
        thread.start()

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._requests_lock:
                self._requests.discard(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("metrics request from %s failed", client_address, exc_info=True)

    def join_requests(self) -> None:
        with self._requests_lock:
            threads = list(self._requests)
        for thread in threads:
            thread.join(_RequestHandler.timeout + 1.0)


class MetricsServer:
    """``/metrics`` and ``/healthz`` over plain HTTP on ``bind``, served by a thread.

    Binding raises ``OSError`` (address in use ...) and a malformed ``bind``
    ``ValueError``. The ``StatsCollector`` is registered on prometheus_client's
    default registry until ``close()``. With ``serving=False``, ``/healthz`` answers
    503 until ``set_serving()``: the listener is up before the server it reports on.
    """

    def __init__(self, bind: str, stats: Callable[[], Mapping[str, Any]], *, serving: bool = True) -> None:
        host, port = parse_bind(bind)
        self.collector = StatsCollector(stats)
        self._serving = threading.Event()
        if serving:
            self._serving.set()
        self._stopping = threading.Event()
        # prometheus_client's own app: content negotiation (text or OpenMetrics),
        # gzip and ?name[]= filtering come with it.
        self._metrics_app = make_wsgi_app(REGISTRY)
        try:
            self._httpd = _HTTPServer(host, port, self._app)
        except OSError as exc:
            # The socket's own error names no address ("[Errno 98] Address already in use").
            where = format_address(host, port)
            raise OSError(exc.errno, f"metrics_bind {where}: {exc.strerror or exc}") from exc
        try:
            REGISTRY.register(self.collector)
        except BaseException:
            self._httpd.server_close()
            raise
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="warpsocket-metrics"
        )
        self._thread.start()
        logger.info("metrics on http://%s/metrics", format_address(*self.address))

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``; the real port when ``bind`` asked for port 0."""
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def worker_timings(self) -> HandlerTimings:
        """New timings for one worker thread (see ``StatsCollector.worker_timings``)."""
        return self.collector.worker_timings()

    def set_serving(self) -> None:
        """From now on ``/healthz`` answers 200 (until ``set_stopping()``)."""
        self._serving.set()

    def set_stopping(self) -> None:
        """From now on ``/healthz`` answers 503."""
        self._stopping.set()

    def close(self) -> None:
        """Stop serving, free the address and unregister the collector; idempotent."""
        if not self._thread.is_alive():
            return
        self._httpd.shutdown()
        self._thread.join()
        self._httpd.server_close()
        self._httpd.join_requests()
        REGISTRY.unregister(self.collector)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            try:
                return cast(Iterable[bytes], self._metrics_app(environ, start_response))
            except Exception:
                logger.exception("metrics scrape failed")
                start_response("500 Internal Server Error", [*_TEXT], sys.exc_info())
                return [b"scrape failed\n"]
        if path == "/healthz":
            if environ["REQUEST_METHOD"] != "GET":
                start_response("405 Method Not Allowed", [*_TEXT, ("Allow", "GET")])
                return [b"method not allowed\n"]
            if self._stopping.is_set():
                start_response("503 Service Unavailable", [*_TEXT])
                return [b"stopping"]
            if not self._serving.is_set():
                start_response("503 Service Unavailable", [*_TEXT])
                return [b"starting"]
            start_response("200 OK", [*_TEXT])
            return [b"ok"]
        start_response("404 Not Found", [*_TEXT])
        return [b"not found\n"]


# A tuple, copied into each response's list: wsgiref adds Content-Length to the list it gets.
_TEXT = (("Content-Type", "text/plain; charset=utf-8"),)
