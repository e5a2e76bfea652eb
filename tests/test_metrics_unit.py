"""The metrics listener on its own (docs/api.md#metrics): real HTTP, promtool and a real Prometheus.

The server's stats come from a plain function returning a dict shaped like
``warpsocket.stats()``; the end-to-end tests drive the same code from a real server.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, Counter
from prometheus_client.parser import text_string_to_metric_families
from prometheus_helper import promtool_check_metrics, running_prometheus
from warpsocket.addresses import parse_bind
from warpsocket.codes import HandlerKind
from warpsocket.metrics import BUCKETS, MetricsServer

OPEN, TEXT, BINARY, CLOSE, PRESENCE = HandlerKind


class FakeStats:
    """A ``stats()`` stand-in: a dict that tests change between scrapes."""

    def __init__(self):
        self.calls = 0
        self.values = {
            "connections": 3,
            "virtual_sockets": 1,
            "channels": 2,
            "subscriptions": 4,
            "keys": 5,
            "messages_in": 10,
            "messages_out": 20,
            "bytes_in": 100,
            "bytes_out": 200,
            "backpressure_closes": 1,
            "node_id": 0,
            "cluster_messages_out": 0,
            "cluster_messages_in": 0,
            "cluster_send_failures": 0,
            "workers": [
                {"id": 1, "connections": 2, "queue_depth": 0},
                {"id": 2, "connections": 1, "queue_depth": 3},
            ],
            "handshakes_refused": {400: 2, 503: 1},
            "closes": {1000: 5, 1001: 2},
            "worker_retirements": 1,
        }

    def __call__(self):
        self.calls += 1
        return dict(self.values)


def url(server, path):
    host, port = server.address
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}{path}"


def get(server, path):
    """``(status, headers, body)`` of a GET, also for error statuses."""
    try:
        with urllib.request.urlopen(url(server, path), timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read()


def scrape(server):
    status, headers, body = get(server, "/metrics")
    assert status == 200, body
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def samples(family):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}


def metrics_threads():
    return [t for t in threading.enumerate() if t.name.startswith("warpsocket-metrics") and t.is_alive()]


@pytest.fixture
def fake_stats():
    return FakeStats()


@pytest.fixture
def metrics(fake_stats):
    server = MetricsServer("127.0.0.1:0", fake_stats)
    yield server
    server.close()
    assert not metrics_threads()


def test_stats_gauges_and_counters(metrics, fake_stats):
    status, headers, _ = get(metrics, "/metrics")
    assert status == 200
    # Without an Accept header: the classic text exposition format.
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    page = scrape(metrics)
    for key in ("connections", "virtual_sockets", "channels", "subscriptions", "keys"):
        family = page[f"warpsocket_{key}"]
        assert family.type == "gauge"
        assert samples(family) == {(f"warpsocket_{key}", ()): fake_stats.values[key]}
    for key in ("messages_in", "messages_out", "bytes_in", "bytes_out", "backpressure_closes",
                "worker_retirements", "cluster_messages_in"):  # fmt: skip
        family = page[f"warpsocket_{key}"]  # the parser drops the _total suffix from the family
        assert family.type == "counter"
        assert samples(family) == {(f"warpsocket_{key}_total", ()): fake_stats.values[key]}

    # stats() is read per scrape.
    calls = fake_stats.calls
    fake_stats.values["connections"] = 7
    fake_stats.values["messages_in"] = 15
    page = scrape(metrics)
    assert fake_stats.calls == calls + 1
    assert samples(page["warpsocket_connections"]) == {("warpsocket_connections", ()): 7}
    assert samples(page["warpsocket_messages_in"]) == {("warpsocket_messages_in_total", ()): 15}


def test_labelled_families(metrics):
    page = scrape(metrics)
    assert page["warpsocket_worker_connections"].type == "gauge"
    assert samples(page["warpsocket_worker_connections"]) == {
        ("warpsocket_worker_connections", (("worker", "1"),)): 2,
        ("warpsocket_worker_connections", (("worker", "2"),)): 1,
    }
    assert samples(page["warpsocket_worker_queue_depth"]) == {
        ("warpsocket_worker_queue_depth", (("worker", "1"),)): 0,
        ("warpsocket_worker_queue_depth", (("worker", "2"),)): 3,
    }
    assert page["warpsocket_handshakes_refused"].type == "counter"
    assert samples(page["warpsocket_handshakes_refused"]) == {
        ("warpsocket_handshakes_refused_total", (("status", "400"),)): 2,
        ("warpsocket_handshakes_refused_total", (("status", "503"),)): 1,
    }
    assert page["warpsocket_closes"].type == "counter"
    assert samples(page["warpsocket_closes"]) == {
        ("warpsocket_closes_total", (("code", "1000"),)): 5,
        ("warpsocket_closes_total", (("code", "1001"),)): 2,
    }


def test_cluster_and_unknown_keys(metrics, fake_stats):
    fake_stats.values.update(node_id=2, redis_connected=True, cluster_send_failures=4, some_new_count=9)
    fake_stats.values["keys"] = -1  # Redis cannot be asked: unknown, so absent
    page = scrape(metrics)
    assert samples(page["warpsocket_node_id"]) == {("warpsocket_node_id", ()): 2}
    assert page["warpsocket_redis_connected"].type == "gauge"
    assert samples(page["warpsocket_redis_connected"]) == {("warpsocket_redis_connected", ()): 1}
    assert samples(page["warpsocket_cluster_send_failures"]) == {
        ("warpsocket_cluster_send_failures_total", ()): 4
    }
    assert page["warpsocket_some_new_count"].type == "gauge"
    assert "warpsocket_keys" not in page


def test_histograms(metrics):
    first, second = metrics.worker_timings(), metrics.worker_timings()
    first.record(TEXT, 0.00002, 0.00003)
    first.record(TEXT, 0.2, 3.0)
    second.record(TEXT, 0.00002, 0.00001)  # exactly on a bound: counts in that bucket (le)
    second.record(OPEN, 0.001, 20.0)  # above the last bound: only in +Inf
    page = scrape(metrics)
    for name in ("warpsocket_handler_duration_seconds", "warpsocket_queue_wait_seconds"):
        assert page[name].type == "histogram"
        handlers = {s.labels["handler"] for s in page[name].samples}
        assert handlers == {"open", "text", "binary", "close", "presence"}
        les = [s.labels["le"] for s in page[name].samples
               if s.name.endswith("_bucket") and s.labels["handler"] == "close"]  # fmt: skip
        assert [float(le) for le in les] == [*BUCKETS, float("inf")]
    duration = samples(page["warpsocket_handler_duration_seconds"])

    def bucket(handler, le):
        return duration[("warpsocket_handler_duration_seconds_bucket", (("handler", handler), ("le", le)))]

    def total(suffix, handler):
        return duration[(f"warpsocket_handler_duration_seconds_{suffix}", (("handler", handler),))]

    assert bucket("text", "1e-05") == 1
    assert bucket("text", "2.5e-05") == 1
    assert bucket("text", "5e-05") == 2
    assert bucket("text", "2.5") == 2
    assert bucket("text", "5.0") == 3
    assert bucket("text", "+Inf") == 3
    assert total("count", "text") == 3
    assert total("sum", "text") == pytest.approx(3.00004)
    assert bucket("open", "10.0") == 0
    assert bucket("open", "+Inf") == 1
    assert total("count", "binary") == 0
    wait = samples(page["warpsocket_queue_wait_seconds"])
    assert wait[("warpsocket_queue_wait_seconds_count", (("handler", "text"),))] == 3
    assert wait[("warpsocket_queue_wait_seconds_sum", (("handler", "open"),))] == pytest.approx(0.001)


def test_timings_from_many_threads_add_up(metrics):
    # Each thread writes only its own timings, without a lock; a scrape sums them.
    per_thread, threads = 20_000, 4
    barrier = threading.Barrier(threads)

    def work():
        timings = metrics.worker_timings()
        barrier.wait()
        for i in range(per_thread):
            timings.record((BINARY, CLOSE)[i % 2], 0.0001, 0.0001)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    duration = samples(scrape(metrics)["warpsocket_handler_duration_seconds"])
    for handler in ("binary", "close"):
        key = ("warpsocket_handler_duration_seconds_count", (("handler", handler),))
        assert duration[key] == threads * per_thread / 2


def test_application_metrics_on_the_same_page(metrics):
    counter = Counter("warpsocket_test_app_logins", "Logins seen by the test application.", ["method"])
    try:
        counter.labels("password").inc(3)
        page = scrape(metrics)
        logins = samples(page["warpsocket_test_app_logins"])
        assert logins == {("warpsocket_test_app_logins_total", (("method", "password"),)): 3}
        assert "warpsocket_connections" in page
    finally:
        REGISTRY.unregister(counter)


def test_healthz(metrics):
    status, headers, body = get(metrics, "/healthz")
    assert (status, body) == (200, b"ok")
    metrics.set_stopping()
    status, _, body = get(metrics, "/healthz")
    assert status == 503
    # /metrics keeps answering while stopping.
    assert get(metrics, "/metrics")[0] == 200


def test_healthz_waits_for_set_serving(fake_stats):
    def healthz(server):
        status, _, body = get(server, "/healthz")
        return status, body

    with MetricsServer("127.0.0.1:0", fake_stats, serving=False) as server:
        assert healthz(server) == (503, b"starting")
        server.set_serving()
        assert healthz(server) == (200, b"ok")
        server.set_stopping()
        assert healthz(server) == (503, b"stopping")


def test_other_paths_and_methods(metrics):
    for path in ("/", "/metrics/", "/healthz/x", "/favicon.ico", "/static/index.html"):
        assert get(metrics, path)[0] == 404, path
    request = urllib.request.Request(url(metrics, "/healthz"), data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code == 405
    raised.value.close()


def test_failing_stats_gives_500_and_a_log(fake_stats, caplog):
    def broken():
        raise RuntimeError("stats exploded")

    with MetricsServer("127.0.0.1:0", broken) as server, caplog.at_level(logging.ERROR, "warpsocket"):
        status, _, _ = get(server, "/metrics")
        assert status == 500
        assert "stats exploded" in caplog.text
        assert get(server, "/healthz")[0] == 200


def test_close_frees_the_port_and_unregisters(fake_stats):
    server = MetricsServer("127.0.0.1:0", fake_stats)
    host, port = server.address
    assert port != 0
    assert get(server, "/metrics")[0] == 200
    server.close()
    server.close()  # idempotent
    assert not metrics_threads()
    assert REGISTRY.get_sample_value("warpsocket_connections") is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=5).close()
    # start / stop / start in one process, on the very same port.
    with MetricsServer(f"127.0.0.1:{port}", fake_stats) as again:
        assert again.address == (host, port)
        assert get(again, "/healthz")[2] == b"ok"
    assert not metrics_threads()


def test_bind_errors(fake_stats):
    for bad in ("9100", "localhost", ":9100", "::1:9100", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:70000"):
        with pytest.raises(ValueError, match="metrics_bind"):
            MetricsServer(bad, fake_stats)
    with pytest.raises(TypeError, match="metrics_bind"):
        MetricsServer(9100, fake_stats)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            MetricsServer(f"127.0.0.1:{taken.getsockname()[1]}", fake_stats)
    # A failed start leaves nothing registered or running behind.
    assert REGISTRY.get_sample_value("warpsocket_connections") is None
    assert not metrics_threads()
    assert parse_bind("[::1]:9100") == ("::1", 9100)
    assert parse_bind("localhost:0") == ("localhost", 0)


def test_ipv6(fake_stats):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    with MetricsServer("[::1]:0", fake_stats) as server:
        assert server.address[0] == "::1"
        assert get(server, "/healthz")[0] == 200


def test_a_stalled_client_does_not_block_others(metrics):
    with socket.create_connection(metrics.address, timeout=10) as stalled:
        stalled.sendall(b"GET /metr")  # and nothing more
        started = time.monotonic()
        assert get(metrics, "/healthz")[0] == 200
        assert time.monotonic() - started < 2
    # close() (in the fixture) waits for the stalled request's thread to end.


def test_promtool_accepts_the_page(metrics):
    metrics.worker_timings().record(TEXT, 0.0001, 0.0002)
    counter = Counter("warpsocket_test_app_events", "Events seen by the test application.")
    try:
        counter.inc()
        _, _, body = get(metrics, "/metrics")
    finally:
        REGISTRY.unregister(counter)
    result = promtool_check_metrics(body)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout  # no lint findings either


@pytest.mark.timeout(240)
def test_a_real_prometheus_scrapes_it(metrics, fake_stats, tmp_path):
    timings = metrics.worker_timings()
    for _ in range(5):
        timings.record(TEXT, 0.0001, 0.0002)
    host, port = metrics.address
    with running_prometheus(tmp_path / "prometheus", [f"{host}:{port}"]) as prometheus:
        result = prometheus.wait_for_series('warpsocket_connections{job="warpsocket"}')
        assert float(result[0]["value"][1]) == 3
        fake_stats.values["connections"] = 11
        prometheus.wait_for_series("warpsocket_connections == 11")
        workers = prometheus.query("warpsocket_worker_queue_depth")
        assert {r["metric"]["worker"]: float(r["value"][1]) for r in workers} == {"1": 0, "2": 3}
        closes = prometheus.query("warpsocket_closes_total")
        assert {r["metric"]["code"]: float(r["value"][1]) for r in closes} == {"1000": 5, "1001": 2}
        count = prometheus.query('warpsocket_handler_duration_seconds_count{handler="text"}')
        assert float(count[0]["value"][1]) == 5
        quantile = prometheus.query(
            'histogram_quantile(0.99, warpsocket_handler_duration_seconds_bucket{handler="text"})'
        )
        assert 0.0001 < float(quantile[0]["value"][1]) <= 0.00025

        # Every query of the Grafana dashboard in docs/ is valid and finds its series.
        dashboard = json.loads((Path(__file__).parents[1] / "docs" / "grafana-dashboard.json").read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
        assert len(exprs) >= 6
        for expr in exprs:
            expr = expr.replace("$__rate_interval", "10s").replace("$job", ".*").replace("$instance", ".*")
            prometheus.wait_for_series(expr)
