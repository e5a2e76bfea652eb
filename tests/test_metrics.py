"""Metrics and health end to end (docs/api.md#metrics): a real server with ``metrics_bind``,
real ``websockets`` clients, the page parsed, ``promtool``, a real Prometheus, and
``/healthz`` through ``stop()`` and a signal.

(The listener on its own, with a stand-in ``stats()``, is in test_metrics_unit.py.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import warpsocket
from helpers import (
    RawConn,
    ServerProcess,
    ask,
    connect,
    expect_close,
    free_port,
    http_request_bytes,
    tcp_connectable,
    upgrade_headers,
    wait_for,
    warpsocket_command,
    warpsocket_threads,
)
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_helper import promtool_check_metrics, running_prometheus
from warpsocket import metrics
from websockets.exceptions import InvalidStatus

# The application's own metric lives in a module of its own, imported (once per
# process) by every worker instance: registering it in each would clash.
APP_METRICS = """
import threading
from prometheus_client import Counter

OPENS = Counter("warpsocket_test_app_opens", "Connections the test application accepted.")
# Set by the test: handle_close of a "/slow" connection waits for it.
GATE = threading.Event()
"""

WORKER = """
import asyncio

import warpsocket
from {app} import GATE, OPENS

def handle_open(socket_id, ip, headers):
    if headers[":path"] == "/forbidden":
        return False
    OPENS.inc()
    if headers[":path"] == "/slow":
        SLOW.add(socket_id)
    return True

SLOW = set()

def handle_text_message(text, socket_id):
    if text == "close-me":
        warpsocket.close(socket_id)
    elif text == "boom":
        raise RuntimeError("the test asked for it")
    else:
        warpsocket.send(socket_id, text)

async def handle_close(socket_id):
    # Async, so that the queue wait and duration of an awaited handler are measured.
    if socket_id in SLOW:
        while not GATE.is_set():
            await asyncio.sleep(0.01)
"""

KINDS = ("open", "text", "binary", "close", "presence")
HISTOGRAMS = ("warpsocket_handler_duration_seconds", "warpsocket_queue_wait_seconds")


class App:
    """The test application: its worker file, and its metrics module once a worker imported it."""

    def __init__(self, worker, module_name):
        self.worker = worker
        self.module_name = module_name

    @property
    def module(self):
        return sys.modules[self.module_name]


@pytest.fixture
def app(write_worker, tmp_path):
    """The worker's metrics module sits next to it (importable), and is forgotten after the test."""
    name = f"ws_app_metrics_{os.getpid()}_{tmp_path.name}"
    write_worker(APP_METRICS, name=name)
    try:
        yield App(str(write_worker(WORKER.format(app=name))), name)
    finally:
        module = sys.modules.pop(name, None)
        if module is not None:
            module.GATE.set()
            with contextlib.suppress(KeyError):
                REGISTRY.unregister(module.OPENS)


def url(address, path):
    host, port = address
    return f"http://{host}:{port}{path}"


def get(address, path):
    """``(status, body)`` of a GET, also for error statuses."""
    try:
        with urllib.request.urlopen(url(address, path), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def scrape(address):
    status, body = get(address, "/metrics")
    assert status == 200, body
    return body, {f.name: f for f in text_string_to_metric_families(body.decode())}


def values(family):
    """``{(sample name, ((label, value), ...)): value}`` of a parsed family."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}


def by_label(family, suffix, label):
    """``{label value: sample value}`` of the family's samples named ``<family><suffix>``."""
    return {s.labels[label]: s.value for s in family.samples if s.name == family.name + suffix}


def histogram_counts(page, name):
    return {s.labels["handler"]: s.value for s in page[name].samples if s.name == name + "_count"}


def scrape_until(address, check, message):
    """Scrape until ``check(page)`` holds (handlers record just after they answer); return the page."""

    def scraped():
        body, page = scrape(address)
        return check(page) and (body, page)

    return wait_for(scraped, message=message)


def refuse_raw(port, headers):
    """Send a hand-made upgrade request; return the answer's status."""
    with RawConn(port) as conn:
        conn.sendall(http_request_bytes("/", headers, port))
        status, _, _ = conn.read_http_response()
        return status


@pytest.mark.timeout(240)
def test_the_page_promtool_and_a_real_prometheus(start_server, app, tmp_path):
    before = warpsocket.stats()
    server = start_server(worker=app.worker, metrics_bind="127.0.0.1:0", threads=2)
    address = server.metrics_address
    assert address is not None and address[0] == "127.0.0.1" and address[1] not in (0, server.port)

    kept = connect(server)
    for i in range(3):
        assert ask(kept, f"hello {i}") == f"hello {i}"
    with connect(server) as ws:
        ws.send("close-me")
        assert expect_close(ws) == (1000, "")
    with connect(server) as ws:
        ws.send(b"\x00binary, and no handler for it")
        assert expect_close(ws)[0] == 1003
    with connect(server) as ws:
        ws.send("boom")
        assert expect_close(ws)[0] == 1011
    with pytest.raises(InvalidStatus) as refused:
        connect(server, "/forbidden")
    assert refused.value.response.status_code == 403
    assert refuse_raw(server.port, upgrade_headers(Sec_WebSocket_Key=None)) == 400

    # Every handler call: 5 opens (one refused), 5 texts, 3 closes; the binary
    # message had no handler. A call is recorded just after its handler returns.
    calls = {"open": 5, "text": 5, "binary": 0, "close": 3, "presence": 0}
    body, page = scrape_until(
        address,
        lambda page: all(histogram_counts(page, n) == calls for n in HISTOGRAMS),
        "every handler call on the page",
    )
    now = warpsocket.stats()

    # Every int of stats() under its name: gauges, and counters with _total.
    for key in ("connections", "virtual_sockets", "channels", "subscriptions", "keys"):
        family = page[f"warpsocket_{key}"]
        assert family.type == "gauge", key
        assert values(family) == {(f"warpsocket_{key}", ()): now[key]}, key
    assert now["connections"] == 1
    for key in ("messages_in", "messages_out", "bytes_in", "bytes_out", "backpressure_closes"):
        family = page[f"warpsocket_{key}"]
        assert family.type == "counter", key
        assert values(family) == {(f"warpsocket_{key}_total", ()): now[key]}, key
    assert now["messages_in"] - before["messages_in"] == 5  # the binary message had no handler
    assert now["messages_out"] - before["messages_out"] == 3

    # Per worker, labelled with the ids stats() reports.
    workers = {str(w["id"]): w for w in now["workers"]}
    assert len(workers) == 2
    connections = page["warpsocket_worker_connections"]
    assert connections.type == "gauge"
    assert by_label(connections, "", "worker") == {k: w["connections"] for k, w in workers.items()}
    assert sum(by_label(connections, "", "worker").values()) == 1
    depth = page["warpsocket_worker_queue_depth"]
    assert by_label(depth, "", "worker") == {k: 0 for k in workers}

    # Refusals by status and closes by code: exactly this test's.
    refusals = page["warpsocket_handshakes_refused"]
    assert refusals.type == "counter"
    counted = {int(k): v for k, v in by_label(refusals, "_total", "status").items()}
    assert counted == now["handshakes_refused"]
    assert {k: v - before["handshakes_refused"].get(k, 0) for k, v in counted.items()} == {
        k: 1 if k in (400, 403) else 0 for k in counted
    }
    closes = page["warpsocket_closes"]
    assert closes.type == "counter"
    counted = {int(k): v for k, v in by_label(closes, "_total", "code").items()}
    assert counted == now["closes"]
    assert {k: v - before["closes"].get(k, 0) for k, v in counted.items()} == {
        k: 1 if k in (1000, 1003, 1011) else 0 for k in counted
    }
    retirements = page["warpsocket_worker_retirements"]
    assert values(retirements) == {("warpsocket_worker_retirements_total", ()): now["worker_retirements"]}

    # Histograms in seconds by handler kind: one observation per handler call.
    for name in HISTOGRAMS:
        family = page[name]
        assert family.type == "histogram"
        buckets = [s for s in family.samples if s.name == name + "_bucket" and s.labels["handler"] == "text"]
        assert [float(s.labels["le"]) for s in buckets] == [*metrics.BUCKETS, float("inf")]
        assert buckets[-1].value == 5
        sums = {s.labels["handler"]: s.value for s in family.samples if s.name == name + "_sum"}
        assert set(sums) == set(KINDS)
        assert 0 < sums["text"] < 5 * 10, sums  # seconds, not milliseconds

    # The application's counter, registered with prometheus_client, on the same page.
    assert values(page["warpsocket_test_app_opens"]) == {("warpsocket_test_app_opens_total", ()): 4.0}

    # The public port never serves them.
    for path in ("/metrics", "/healthz"):
        with RawConn(server.port) as conn:
            conn.sendall(http_request_bytes(path, None, server.port))
            assert conn.read_http_response()[0] == 426

    result = promtool_check_metrics(body)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout

    host, port = address
    with running_prometheus(tmp_path / "prometheus", [f"{host}:{port}"]) as prometheus:
        up = prometheus.wait_for_series('up{job="warpsocket"} == 1')
        assert len(up) == 1
        prometheus.wait_for_series("warpsocket_connections == 1")
        result = prometheus.query('warpsocket_closes_total{code="1003"}')
        assert float(result[0]["value"][1]) == now["closes"][1003]
        result = prometheus.query("warpsocket_handshakes_refused_total")
        assert {r["metric"]["status"] for r in result} >= {"400", "403"}
        result = prometheus.query('warpsocket_handler_duration_seconds_count{handler="text"}')
        assert float(result[0]["value"][1]) == 5
        result = prometheus.query("warpsocket_worker_connections")
        assert {r["metric"]["worker"] for r in result} == set(workers)
        # More traffic shows up in the next scrapes.
        assert ask(kept, "one more") == "one more"
        prometheus.wait_for_series('warpsocket_handler_duration_seconds_count{handler="text"} == 6')
        prometheus.wait_for_series(
            'histogram_quantile(0.99, warpsocket_queue_wait_seconds_bucket{handler="text"}) > 0'
        )
        prometheus.wait_for_series("warpsocket_test_app_opens_total == 4")
    kept.close()


@pytest.mark.timeout(120)
def test_healthz_turns_503_during_stop_and_the_address_is_freed(start_server, app):
    # handler_timeout: the slow handle_close must not be cut short while the test looks.
    server = start_server(worker=app.worker, metrics_bind="127.0.0.1:0", handler_timeout=60.0)
    address = server.metrics_address
    assert get(address, "/healthz") == (200, b"ok")
    slow = connect(server, "/slow")
    assert ask(slow, "ping") == "ping"

    seen = []
    polling = threading.Event()

    def poll():
        # From another thread, as a load balancer would, while stop() runs.
        while polling.is_set():
            try:
                seen.append(get(address, "/healthz")[0])
            except OSError:
                seen.append("refused")
            time.sleep(0.005)

    polling.set()
    poller = threading.Thread(target=poll)
    poller.start()
    stopper = threading.Thread(target=server.stop, kwargs={"timeout": 30})
    try:
        wait_for(lambda: 200 in seen, message="a 200 before stop()")
        stopper.start()
        # handle_close of the slow connection holds stop() until the gate opens.
        wait_for(lambda: seen.count(503) >= 3, message="/healthz answering 503 during stop()")
        assert server.running
        assert expect_close(slow)[0] == 1001
        status, body = get(address, "/healthz")
        assert (status, body) == (503, b"stopping")
        assert get(address, "/metrics")[0] == 200, "metrics stay readable while draining"
    finally:
        app.module.GATE.set()
        if stopper.ident is not None:
            stopper.join(30)
            # The poller may be between two polls when stop() returns: let it find
            # the port closed once before it stops (the assertions below look for it).
            deadline = time.monotonic() + 10
            while not stopper.is_alive() and seen[-1:] != ["refused"] and time.monotonic() < deadline:
                time.sleep(0.01)
        polling.clear()
        poller.join()
        slow.close()
    assert not stopper.is_alive() and not server.running
    # 200 until stop() began, then 503 until it returned, then nothing listens.
    first_503 = seen.index(503)
    assert set(seen[:first_503]) == {200}
    tail = seen[first_503:]
    assert "refused" in tail and 200 not in tail
    assert set(tail[: tail.index("refused")]) == {503}
    assert not tcp_connectable(*address)
    with socket.create_server(address):
        pass  # the address is free again


@pytest.mark.timeout(120)
def test_a_retired_worker_is_counted(start_server, write_worker):
    worker = write_worker(
        """
        import time
        import warpsocket

        def handle_text_message(text, socket_id):
            if text == "hang":
                time.sleep(4)
            warpsocket.send(socket_id, text)
        """
    )
    before = warpsocket.stats()
    server = start_server(worker=str(worker), metrics_bind="127.0.0.1:0", threads=2, hang_timeout=1.0)
    with connect(server) as ws:
        ws.send("hang")
        assert expect_close(ws)[0] == 1011

    def retired(page):
        (sample,) = page["warpsocket_worker_retirements"].samples
        return sample.value > before["worker_retirements"]

    _, page = scrape_until(server.metrics_address, retired, "the retirement on the page")
    closes = {int(k): v for k, v in by_label(page["warpsocket_closes"], "_total", "code").items()}
    assert closes[1011] - before["closes"].get(1011, 0) == 1
    # The replacement serves, and shows as a worker of its own.
    with connect(server) as ws:
        assert ask(ws, "still here") == "still here"
    ids = {str(w["id"]) for w in warpsocket.stats()["workers"]}
    _, page = scrape(server.metrics_address)
    assert set(by_label(page["warpsocket_worker_queue_depth"], "", "worker")) == ids


def test_metrics_bind_is_checked_and_a_taken_address_leaves_nothing_running(start_server, write_worker):
    worker = str(write_worker("def handle_text_message(text, socket_id):\n    pass\n"))
    with pytest.raises(ValueError, match="metrics_bind"):
        warpsocket.start(bind="127.0.0.1:0", worker=worker, metrics_bind="nowhere")
    with pytest.raises(TypeError, match="metrics_bind"):
        warpsocket.start(bind="127.0.0.1:0", worker=worker, metrics_bind=9100)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"metrics_bind 127.0.0.1:{port}: Address already in use") as caught:
            warpsocket.start(bind="127.0.0.1:0", worker=worker, metrics_bind=f"127.0.0.1:{port}")
        assert caught.value.errno == errno.EADDRINUSE
    assert not warpsocket_threads()
    # Nothing was left running: a server starts, and without metrics_bind has no listener.
    server = start_server(worker=worker)
    assert server.metrics_address is None


@pytest.mark.timeout(120)
def test_cli_metrics_flag_and_healthz_on_a_signal(tmp_path):
    release = tmp_path / "release"
    worker = tmp_path / "cli_metrics_worker.py"
    worker.write_text(
        "import os, time\n"
        "ARG = None\n"
        "def handle_start(worker_arg):\n"
        "    global ARG\n"
        "    ARG = worker_arg\n"
        "def handle_text_message(text, socket_id):\n"
        "    import warpsocket\n"
        "    warpsocket.send(socket_id, text)\n"
        "def handle_close(socket_id):\n"
        "    while not os.path.exists(ARG):\n"
        "        time.sleep(0.01)\n"
    )
    port, metrics_port = free_port(), free_port()
    argv = warpsocket_command(
        worker,
        "--bind",
        f"127.0.0.1:{port}",
        "--metrics",
        f"127.0.0.1:{metrics_port}",
        "--worker-arg",
        f'"{release}"',
        "--threads",
        "1",
    )
    help_text = ServerProcess(warpsocket_command("--help"))
    assert help_text.wait(30) == 0
    assert "--metrics ADDR" in help_text.output()

    cli = ServerProcess(argv, cwd=tmp_path, port=port)
    address = ("127.0.0.1", metrics_port)
    try:
        cli.wait_listening()
        wait_for(lambda: get(address, "/healthz") == (200, b"ok"), message="/healthz 200")
        ws = connect(f"ws://127.0.0.1:{port}/")
        assert ask(ws, "hi") == "hi"
        wait_for(
            lambda: (
                'warpsocket_handler_duration_seconds_count{handler="text"} 1.0'
                in get(address, "/metrics")[1].decode()
            ),
            message="the text handler's call on the page",
        )
        assert "warpsocket_connections 1.0" in get(address, "/metrics")[1].decode()
        cli.proc.send_signal(signal.SIGTERM)
        # handle_close waits for the release file: the process is draining meanwhile.
        wait_for(lambda: get(address, "/healthz")[0] == 503, message="/healthz 503 after SIGTERM")
        assert expect_close(ws)[0] == 1001
        ws.close()
        assert cli.proc.poll() is None
        release.touch()
        assert cli.wait(30) == 0, cli.output()
    finally:
        release.touch()
        cli.kill()
    assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in cli.output()
    assert not tcp_connectable(*address)
