"""Shared fixtures and helpers for the WarpSocket end-to-end suite.

Every test starts a real server (bound to port 0) running a small worker
module that the test writes into ``tmp_path``.  Handlers report what they saw
back to the test either by sending WebSocket messages to the client or by
appending lines to a log file whose path is passed in as ``worker_arg``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import textwrap

import pytest
import warpsocket
from helpers import (
    ECHO_WORKER,
    REDIS_CLI,
    REDIS_SERVER,
    IdClient,
    LogCollector,
    Redis,
    forget_chat_rooms,
    wait_no_warpsocket_threads,
)

DEFAULT_TEST_TIMEOUT = 120


# --------------------------------------------------------------------------
# pytest configuration
# --------------------------------------------------------------------------


def pytest_configure(config):
    config.addinivalue_line("markers", "timeout(seconds): per-test timeout (pytest-timeout)")


def pytest_collection_modifyitems(config, items):
    # A default per-test timeout so that a hanging server never blocks the run.
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT))


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _forget_chat_rooms():
    # Autouse, so set up before (and torn down after) the test's servers: their
    # handle_close calls are done when the rooms' keys are deleted.
    yield
    forget_chat_rooms()


@pytest.fixture
def write_worker(tmp_path):
    """``write_worker(source, name=None) -> Path`` of a new worker module file."""
    counter = itertools.count()

    def _write(source, name=None):
        if name is None:
            name = f"ws_worker_{os.getpid()}_{next(counter)}"
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        return path

    return _write


@pytest.fixture
def log_path(tmp_path):
    return tmp_path / "events.log"


@pytest.fixture
def start_server(write_worker):
    """``start_server(source=None, *, worker=None, **start_kwargs) -> Server``.

    Defaults: bind 127.0.0.1:0, threads=2.  Every server started is stopped at
    teardown, and the teardown fails if warpsocket threads are left behind.
    """
    servers = []

    def _start(source=None, *, worker=None, **kwargs):
        if worker is None:
            worker = str(write_worker(source if source is not None else ECHO_WORKER))
        kwargs.setdefault("bind", "127.0.0.1:0")
        kwargs.setdefault("threads", 2)
        server = warpsocket.start(worker=worker, **kwargs)
        servers.append(server)
        return server

    try:
        yield _start
    finally:
        for server in servers:
            with contextlib.suppress(Exception):  # best-effort cleanup
                server.stop(timeout=10)
        wait_no_warpsocket_threads(timeout=30)


@pytest.fixture
def make_client(server):
    """``make_client(path="/") -> IdClient`` on the module's ``server`` fixture; closed at teardown."""
    clients = []

    def _make(path="/"):
        client = IdClient(server, path)
        clients.append(client)
        return client

    try:
        yield _make
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()


@pytest.fixture
def warpsocket_log():
    """A :class:`LogCollector` attached to the ``warpsocket`` logger for the test."""
    logger = logging.getLogger("warpsocket")
    handler = LogCollector()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def redis_installed():
    """Skips the test (fails it on CI) when redis-server is missing: for scripts that start their own."""
    if REDIS_SERVER is None or REDIS_CLI is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (.ci/run installs Debian's redis-server)")
        pytest.skip("redis-server is not installed")


@pytest.fixture
def redis(tmp_path, redis_installed):
    """A private redis-server for the test, killed at teardown."""
    server = Redis(tmp_path)
    yield server
    server.kill()
