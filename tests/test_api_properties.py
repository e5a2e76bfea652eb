"""The whole public API with arbitrary Python values (Hypothesis).

Whatever is passed to a function of docs/api.md#functions, an option of ``start()``/``run()``, a
CLI flag or ``stop()``/``wait()``, only the documented exceptions come out (TypeError,
ValueError naming the argument; for ``start`` also OSError, ImportError, RuntimeError),
never a ``PanicException`` or ``SystemError``; the process does not abort, and servers
started afterwards work.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import socket
import sys

import pytest
import warpsocket
from helpers import IdClient, ask, connect
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from warpsocket import _core, cli
from warpsocket.config import MAX_SECONDS, MAX_THREADS, TUNABLES

SURROGATES = ["\ud800", "\udc80", "\udfff"]


class Opaque:
    """An object of a type no API function knows."""

    def __repr__(self):
        return "Opaque()"


def scalars(ids=()):
    """Python values of every kind the API meets, from well-formed to absurd."""
    strategies = [
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from([0, -1, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**400]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([math.inf, -math.inf, math.nan, 1e300, 5e-324, -0.0, MAX_SECONDS * 2]),
        st.text(max_size=20),
        st.builds(
            lambda a, s, b: a + s + b, st.text(max_size=4), st.sampled_from(SURROGATES), st.text(max_size=4)
        ),
        st.binary(max_size=20),
        st.binary(max_size=20).map(bytearray),
        st.binary(max_size=20).map(memoryview),
        st.sampled_from([1000, 1001, 1011, 3000, 4999, 5000, 999, "", "a" * 124, "é" * 70]),
        st.builds(Opaque),
        st.builds(object),
        st.complex_numbers(allow_nan=True),
        st.sampled_from([sys, len, Opaque, {}, set(), (), frozenset({1})]),
    ]
    if ids:
        strategies.append(st.sampled_from(list(ids)))
    return st.one_of(strategies)


def values(ids=()):
    """Scalars, and lists/tuples/dicts of them, nested."""
    return st.recursive(
        scalars(ids),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.lists(inner, max_size=3).map(tuple),
            st.dictionaries(st.text(max_size=3), inner, max_size=2),
        ),
        max_leaves=6,
    )


def assert_names_argument(exc, names):
    message = str(exc)
    assert any(name in message for name in names), f"{type(exc).__name__}({message!r}) names none of {names}"


FUNCTIONS = [
    warpsocket.send,
    warpsocket.subscribe,
    warpsocket.unsubscribe,
    warpsocket.has_subscriptions,
    warpsocket.create_virtual_socket,
    warpsocket.delete_virtual_socket,
    warpsocket.close,
    warpsocket.get_key,
    warpsocket.set_key,
    warpsocket.set_key_if,
    warpsocket.position,
    warpsocket.history,
    warpsocket.recover,
    warpsocket.track,
    warpsocket.untrack,
    warpsocket.presence,
    warpsocket.presence_count,
    warpsocket.stats,
]


# Echoes; answers "id" with the socket id (for IdClient).
WORKER = """
import warpsocket

def handle_text_message(text, socket_id):
    warpsocket.send(socket_id, str(socket_id) if text == "id" else text)

def handle_binary_message(data, socket_id):
    warpsocket.send(socket_id, data)
"""


@pytest.fixture
def worker_file(write_worker):
    return str(write_worker(WORKER))


def echoes(server):
    """A fresh websockets client gets its (one-byte) message back."""
    with connect(server) as ws:
        assert ask(ws, "x", timeout=30) == "x"


@pytest.mark.timeout(180)
def test_functions_take_any_value(worker_file):
    # Every channel keeps history, so that position/history/recover do their work.
    history = {"": warpsocket.History(8)}
    with warpsocket.start(bind="127.0.0.1:0", worker=worker_file, threads=2, history=history) as server:
        client = IdClient(server)
        virtual = warpsocket.create_virtual_socket(client.sid, "v:")
        arguments = values((client.sid, virtual))

        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.data())
        def check(data):
            function = data.draw(st.sampled_from(FUNCTIONS), label="function")
            params = list(inspect.signature(function).parameters.values())
            required = sum(1 for p in params if p.default is inspect.Parameter.empty)
            count = data.draw(st.integers(required, len(params)), label="count")
            args = [data.draw(arguments, label=params[i].name) for i in range(count)]
            try:
                function(*args)
            except (TypeError, ValueError) as exc:
                assert_names_argument(exc, [p.name for p in params])
            finally:
                if function in (warpsocket.set_key, warpsocket.set_key_if) and args:
                    # The kv store outlives the test: leave no keys behind.
                    with contextlib.suppress(TypeError, ValueError):
                        warpsocket.set_key(args[0])

        check()
        with contextlib.suppress(Exception):
            client.close()
        echoes(server)


OPTIONS = list(inspect.signature(warpsocket.start).parameters)


@pytest.mark.timeout(180)
def test_start_options_take_any_value(worker_file):
    # Valid extremes too, so that many examples start a server with them.
    extremes = st.one_of(st.floats(5e-324, MAX_SECONDS), st.integers(1, sys.maxsize))

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(name=st.sampled_from(OPTIONS), value=st.one_of(values(), extremes))
    def check(name, value):
        kwargs = {"bind": "127.0.0.1:0", "worker": worker_file, "threads": 1, name: value}
        if name == "threads" and type(value) is int and 4 < value <= MAX_THREADS:
            # A valid count: starting hundreds of worker threads would only cost time.
            kwargs["threads"] = 4
        try:
            server = warpsocket.start(**kwargs)
        except (TypeError, ValueError) as exc:
            assert_names_argument(exc, [name])
            return
        except (OSError, ImportError, RuntimeError):
            return
        try:
            # A tiny hang_timeout may retire a worker that is merely slow: valid, not testable.
            if not (name == "hang_timeout" and value < 1):
                echoes(server)
        finally:
            server.stop()

    check()


@pytest.fixture
def occupied_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


# The flags that take a value (switches such as --compression take none).
FLAGS = ["--threads", "--worker-arg", "--static", "--cluster", "--log-level"] + [
    t.flag for t in TUNABLES if t.type is not bool
]


def cli_values():
    numbers = st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True)).map(repr)
    odd = st.sampled_from(
        ["inf", "-inf", "nan", "1e400", "-0", "0", "18446744073709551616", "1e-400", "", "x"]
    )
    surrogate = st.builds(lambda a, s: a + s, st.text(max_size=3), st.sampled_from(SURROGATES))
    return st.one_of(numbers, odd, st.text(max_size=10), surrogate)


@pytest.mark.timeout(180)
def test_cli_flags_take_any_value(worker_file, occupied_port):
    """Every flag with any text: a usage error (2) or a logged error (1), nothing else.

    Bound to a port that is taken, so that a run() whose options are all valid fails
    at bind instead of serving.
    """

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(flag=st.sampled_from(FLAGS), value=cli_values())
    def check(flag, value):
        root = logging.getLogger()
        saved = (root.level, list(root.handlers))
        try:
            with pytest.raises(SystemExit) as exited:
                cli.main([worker_file, "--bind", f"127.0.0.1:{occupied_port}", flag, value])
            assert exited.value.code in (1, 2)
        finally:
            root.setLevel(saved[0])
            root.handlers[:] = saved[1]

    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        check()


def test_durations_that_are_not_finite_or_too_large_name_the_option(worker_file):
    for name in ("handler_timeout", "hang_timeout", "ping_interval", "ping_timeout"):
        for value in (math.inf, -math.inf, math.nan, 1e300, 10**400, MAX_SECONDS * 2, 0, -1.0):
            with pytest.raises(ValueError, match=name):
                warpsocket.start(bind="127.0.0.1:0", worker=worker_file, threads=1, **{name: value})
    assert warpsocket.stats()["connections"] == 0


def test_ints_that_do_not_fit_name_the_argument(worker_file):
    for name in ("threads", "max_message_size", "max_backpressure", "max_pending_upgrades"):
        for value in (2**64, 10**400, -(2**70), 0):
            with pytest.raises(ValueError, match=name):
                warpsocket.start(**{"bind": "127.0.0.1:0", "worker": worker_file, "threads": 1, name: value})
    for call, name in [
        (lambda: warpsocket.send(2**64, "x"), "target"),
        (lambda: warpsocket.close(10**30), "socket_id"),
        (lambda: warpsocket.close(1, 2**64), "code"),
        (lambda: warpsocket.close(1, -(2**70)), "code"),
        (lambda: warpsocket.create_virtual_socket(2**80), "socket_id"),
        (lambda: warpsocket.delete_virtual_socket(1, -(2**80)), "expected_target"),
    ]:
        with pytest.raises(ValueError, match=name):
            call()
    # A delta beyond any count saturates: nothing is subscribed, nothing raises.
    assert warpsocket.subscribe(1, "c", 10**40) == []
    assert warpsocket.unsubscribe(1, "c", -(10**40)) == []


def test_lone_surrogates_name_the_argument(worker_file):
    bad = "a\ud800b"
    for call, name in [
        (lambda: warpsocket.send(1, bad), "data"),
        (lambda: warpsocket.send(bad, "x"), "target"),
        (lambda: warpsocket.send([1, bad], "x"), "target"),
        (lambda: warpsocket.subscribe(1, bad), "channel"),
        (lambda: warpsocket.unsubscribe(bad, "c"), "target"),
        (lambda: warpsocket.has_subscriptions(bad), "channel"),
        (lambda: warpsocket.create_virtual_socket(1, bad), "user_prefix"),
        (lambda: warpsocket.get_key(bad), "key"),
        (lambda: warpsocket.set_key("k", bad), "value"),
        (lambda: warpsocket.set_key_if("k", "v", bad), "check_value"),
        (lambda: warpsocket.close(1, 1000, bad), "reason"),
        (lambda: warpsocket.start(bind=f"127.0.0.1:{bad}", worker=worker_file), "bind"),
        (lambda: warpsocket.start(bind="127.0.0.1:0", worker=bad), "worker"),
        (lambda: warpsocket.start(bind="127.0.0.1:0", worker=worker_file, static_dir=bad), "static_dir"),
        (
            lambda: warpsocket.start(bind="127.0.0.1:0", worker=worker_file, cluster="redis://" + bad),
            "cluster",
        ),
    ]:
        with pytest.raises(ValueError, match=name):
            call()


def test_binding_durations_raise_instead_of_panicking():
    for name in ("ping_interval", "ping_timeout", "open_timeout"):
        kwargs = {
            "max_message_size": 1024,
            "max_backpressure": 1024,
            "ping_interval": 1.0,
            "ping_timeout": 1.0,
            "open_timeout": 1.0,
            "max_pending_upgrades": 8,
            "compression": False,
            name: math.inf,
        }
        with pytest.raises(ValueError, match=name):
            _core.Server(["127.0.0.1:0"], **kwargs)


def test_defaults_are_those_of_the_contract():
    close = inspect.signature(warpsocket.close).parameters
    assert (close["code"].default, close["reason"].default) == (1000, "")
    for function in (warpsocket.subscribe, warpsocket.unsubscribe):
        assert inspect.signature(function).parameters["delta"].default == 1


@pytest.mark.timeout(120)
def test_stop_and_wait_timeouts(worker_file):
    server = warpsocket.start(bind="127.0.0.1:0", worker=worker_file, threads=1)
    try:
        for bad in (math.inf, -math.inf, math.nan, 1e300, 10**400, "5", True, [], Opaque()):
            with pytest.raises((TypeError, ValueError), match="timeout"):
                server.stop(timeout=bad)
            with pytest.raises((TypeError, ValueError), match="timeout"):
                server.wait(bad)
        with pytest.raises(TypeError, match="timeout"):
            server.stop(timeout=None)
        # Nothing was stopped: the server serves on.
        assert server.running
        echoes(server)
        assert server.wait(0.01) is False
    finally:
        server.stop(timeout=-1)
    assert not server.running

    @settings(max_examples=100, deadline=None)
    @given(value=values())
    def check(value):
        try:
            assert server.wait(value) is True
        except (TypeError, ValueError) as exc:
            assert_names_argument(exc, ["timeout"])
        try:
            server.stop(value)
        except (TypeError, ValueError) as exc:
            assert_names_argument(exc, ["timeout"])

    check()


def test_a_server_started_afterwards_works(worker_file):
    with warpsocket.start(bind="127.0.0.1:0", worker=worker_file, threads=2) as server:
        echoes(server)
        client = IdClient(server)
        assert warpsocket.send(client.sid, "hi") == 1
        assert client.recv() == "hi"
        client.close()
