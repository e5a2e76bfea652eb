"""History with arbitrary Python values (Hypothesis): docs/api.md#history.

``position``, ``history``, ``recover``, the ``history`` option of ``start()`` and the
``--history`` flag, each given values of every type and size (huge and negative ints, NaN
and infinite ttls, odd prefixes, bytes and str, bytes that are not UTF-8, empty names,
``since`` tuples of the wrong shape) against a running server: each call either works, with
a result of the documented shape, or raises TypeError/ValueError naming the argument;
never a panic nor another exception, and the server serves on afterwards.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import socket
import sys

import pytest
import warpsocket
from helpers import IdClient, ask, connect
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from warpsocket import History, cli
from warpsocket.config import MAX_SECONDS

SURROGATES = ["\ud800", "\udc80", "\udfff"]
# Covered channels start with one of these; "é" as UTF-8 is b"\xc3\xa9", so b"\xc3" covers
# nothing that "é:" covers (the longest prefix wins, but both match).
POLICIES = {"h:": History(8), b"\xff": History(3, 60.0), "é:": History(2, stamp=False), "é": History(4)}

WORKER = """
import warpsocket

def handle_text_message(text, socket_id):
    warpsocket.send(socket_id, str(socket_id) if text == "id" else text)
"""


class Opaque:
    """An object of a type no API function knows."""

    def __repr__(self):
        return "Opaque()"


def names():
    """Channel names: covered or not, str or bytes-like, empty, with surrogates, not UTF-8."""
    prefix = st.sampled_from(["", "h:", "é:", "é", "x"])
    text = st.builds(lambda p, s: p + s, prefix, st.text(max_size=6))
    raw = st.builds(
        lambda p, s: p + s,
        st.sampled_from([b"", b"\xff", b"h:", b"\xc3", "é:".encode()]),
        st.binary(max_size=6),
    )
    surrogate = st.builds(lambda p, s: p + s, prefix, st.sampled_from(SURROGATES))
    covered = st.builds(lambda p, s: p + s, st.sampled_from(["h:", "é:", "é"]), st.text(max_size=2))
    return st.one_of(covered, covered, text, raw, raw.map(bytearray), raw.map(memoryview), surrogate)


def junk():
    """Values of the wrong type, or of the right type and an absurd value."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from([0, -1, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**400, -(10**400)]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=5),
        st.binary(max_size=5),
        st.builds(Opaque),
        st.sampled_from([(), [], {}, set(), (1,), ("e",), ("e", 1, 2), sys, len]),
    )


def offsets():
    return st.one_of(st.integers(0, 20), st.integers(0, 20), st.integers(min_value=0), st.just(2**64), junk())


def epochs(real):
    return st.one_of(
        st.just(real), st.text(max_size=8), st.sampled_from(SURROGATES), st.binary(max_size=4), junk()
    )


def sinces(real):
    """``recover``'s ``since``: (epoch, offset) tuples and lists, and everything else."""
    pair = st.tuples(epochs(real), offsets())
    return st.one_of(
        st.tuples(st.just(real), st.integers(0, 20)),
        pair,
        pair.map(list),
        st.lists(st.one_of(epochs(real), offsets()), max_size=4).map(tuple),
        st.lists(st.one_of(epochs(real), offsets()), max_size=4),
        junk(),
    )


def targets(ids):
    one = st.one_of(st.sampled_from(ids), st.integers(-3, 2**65), junk())
    valid = st.sampled_from(ids)
    return st.one_of(
        valid,
        st.lists(valid, max_size=3),
        one,
        st.lists(one, max_size=3),
        st.lists(one, max_size=3).map(tuple),
    )


def assert_names(exc, *arguments):
    assert any(name in str(exc) for name in arguments), (
        f"{type(exc).__name__}({exc}) names none of {arguments}"
    )


def covered(channel) -> bool:
    data = channel.encode() if isinstance(channel, str) else bytes(channel)
    return any(data.startswith(p.encode() if isinstance(p, str) else p) for p in POLICIES)


def utf8(channel) -> bool:
    if isinstance(channel, str):
        return not any(s in channel for s in SURROGATES)
    return True


def echoes(server):
    with connect(server) as ws:
        assert ask(ws, "x", timeout=30) == "x"


@pytest.mark.timeout(180)
def test_position_history_recover_take_any_value(start_server):
    server = start_server(WORKER, history=POLICIES)
    client = IdClient(server)
    virtual = warpsocket.create_virtual_socket(client.sid, "v|")
    ids = [client.sid, virtual]
    epoch = warpsocket.position("h:a")[0]

    @settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        call = data.draw(
            st.sampled_from(["send", "position", "history", "recover", "recover well"]), label="call"
        )
        well = call == "recover well"  # a target and channel that work: only the since may be odd
        if well:
            channel = data.draw(st.sampled_from(["h:a", "é:b", "é", b"\xff\x00"]), label="channel")
            call = "recover"
        else:
            channel = data.draw(st.one_of(names(), names(), junk()), label="channel")
        valid_name = isinstance(channel, (str, bytes, bytearray, memoryview)) and utf8(channel)
        try:
            if call == "send":
                payload = data.draw(st.one_of(st.text(max_size=5), st.binary(max_size=5)), label="data")
                warpsocket.send(channel, payload)
            elif call == "position":
                got_epoch, offset = warpsocket.position(channel)
                assert isinstance(got_epoch, str) and got_epoch
                assert type(offset) is int and offset >= 0
            elif call == "history":
                args = data.draw(st.lists(offsets(), max_size=2), label="since, limit")
                kept = warpsocket.history(channel, *args)
                numbers = [offset for offset, _ in kept]
                assert numbers == sorted(set(numbers))
                assert all(isinstance(item, (str, bytes)) for _, item in kept)
                if args:
                    assert all(offset > args[0] for offset in numbers)
                if len(args) > 1 and args[1] is not None:
                    assert len(kept) <= args[1]
            else:
                target = data.draw(st.sampled_from(ids) if well else targets(ids), label="target")
                real = warpsocket.position(channel)[0] if valid_name and covered(channel) else epoch
                good = st.tuples(st.just(real), st.integers(0, 20))
                since = data.draw(st.one_of(good, sinces(real)) if well else sinces(real), label="since")
                recovered = warpsocket.recover(target, channel, since)
                assert type(recovered) is bool
                if recovered:
                    assert since[0] == real and since[1] <= warpsocket.position(channel)[1]
        except (TypeError, ValueError) as exc:
            assert_names(exc, "target", "channel", "since", "limit", "data")
            if call == "position":
                assert not (valid_name and covered(channel)), (
                    f"position() of a covered channel raised {exc!r}"
                )
                assert_names(exc, "channel")
        else:
            if call != "send":
                assert valid_name and covered(channel), "a call on a channel no policy covers worked"

    check()
    # The server serves on: the client still gets what is sent to it, stamped where covered.
    warpsocket.unsubscribe(ids, "h:after", -(10**6))
    warpsocket.subscribe(client.sid, "h:after")
    before = warpsocket.position("h:after")[1]
    warpsocket.send("h:after", "ok")
    got = client.received()
    assert f"{before + 1}:ok" in got
    client.close()
    echoes(server)


def test_a_channel_no_policy_covers_is_named(start_server):
    start_server(WORKER, history=POLICIES)
    for channel in ("", "x", b"\xc3", "h", b"h"):
        for function, args in (
            (warpsocket.position, ()),
            (warpsocket.history, (0, None)),
            (warpsocket.recover, (("e", 0),)),
        ):
            if function is warpsocket.recover:
                call = lambda channel=channel: warpsocket.recover(1, channel, ("e", 0))  # noqa: E731
            else:
                call = lambda function=function, channel=channel, args=args: function(channel, *args)  # noqa: E731
            with pytest.raises(ValueError, match="channel"):
                call()


# ---------------------------------------------------------------- the option and the flag


def prefixes():
    return st.one_of(
        st.text(max_size=4),
        st.binary(max_size=4),
        st.sampled_from(["", b"", b"\xff\xfe", "\x00", "é"] + SURROGATES),
        st.integers(),
        st.none(),
        st.floats(),
        st.just(("a",)),
    )


def fields():
    """Policy fields: valid sizes, ttls and stamps, and junk in every position."""
    size = st.one_of(st.integers(1, 50), st.just(sys.maxsize), st.integers(-5, 0), junk())
    ttl = st.one_of(
        st.floats(10, MAX_SECONDS),
        st.sampled_from(
            [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, MAX_SECONDS * 2, 1e300, 10**400, 5e-324]
        ),
        st.integers(-5, 10**6),
        junk(),
    )
    stamp = st.one_of(st.booleans(), junk())
    return st.one_of(
        st.tuples(size),
        st.tuples(size, ttl),
        st.tuples(size, ttl, stamp),
        st.builds(History, size, ttl, stamp),
        st.lists(st.one_of(size, ttl, stamp), max_size=5).map(tuple),
        junk(),
    )


def valid_options():
    """Options start() takes: the extremes of each field included."""
    prefix = st.one_of(
        st.text(max_size=4).filter(lambda p: not any(c in p for c in SURROGATES)), st.binary(max_size=4)
    )
    size = st.one_of(st.integers(1, 50), st.sampled_from([1, sys.maxsize]))
    ttl = st.one_of(st.floats(10, MAX_SECONDS), st.sampled_from([5e-324, 0.0005, 1, MAX_SECONDS]))
    policy = st.one_of(st.builds(History, size, ttl, st.booleans()), st.tuples(size), st.tuples(size, ttl))
    return st.dictionaries(prefix, policy, max_size=3)


def history_options():
    """Mostly valid options (so that servers start), and junk of every kind."""
    junk_options = st.one_of(
        st.dictionaries(prefixes(), fields(), max_size=3), junk(), st.lists(st.tuples(prefixes(), fields()))
    )
    # one_of draws its branches about evenly: two of three valid.
    return st.one_of(valid_options(), valid_options(), junk_options)


def lasting(option, channel) -> bool:
    """Whether the one policy covering ``channel`` keeps messages well past the checks."""
    data = channel.encode() if isinstance(channel, str) else channel
    matching = [
        (len(key), policy)
        for key, policy in ((k.encode() if isinstance(k, str) else k, p) for k, p in option.items())
        if data.startswith(key)
    ]
    longest = max(length for length, _ in matching)
    rules = [policy for length, policy in matching if length == longest]
    return len(rules) == 1 and History(*rules[0]).ttl >= 10


@pytest.mark.timeout(180)
def test_the_history_option_takes_any_value(write_worker):
    worker = str(write_worker(WORKER))

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(value=history_options())
    def check(value):
        try:
            server = warpsocket.start(bind="127.0.0.1:0", worker=worker, threads=1, history=value)
        except (TypeError, ValueError) as exc:
            assert_names(exc, "history")
            event("refused")
            return
        event("started")
        try:
            echoes(server)
            for prefix in value or {}:
                channel = prefix + ("c" if isinstance(prefix, str) else b"c")
                assert warpsocket.send(channel, "m") == 0
                epoch, offset = warpsocket.position(channel)
                if lasting(value, channel):
                    assert offset >= 1
                    assert warpsocket.history(channel)[-1] == (offset, "m")
                    assert warpsocket.recover([], channel, (epoch, offset)) is True
        finally:
            server.stop()

    check()


def flag_texts():
    number = st.one_of(
        st.integers().map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.sampled_from(["", "x", "0", "-1", "1e400", "nan", "inf", "-inf", "1_0", " 5", "5 ", "0x10", "٣"]),
    )
    prefix = st.one_of(st.text(max_size=4), st.sampled_from(["", "=", "a=b", "room:"] + SURROGATES))
    structured = st.builds(
        lambda p, size, slash, ttl: f"{p}={size}{slash}{ttl}",
        prefix,
        number,
        st.sampled_from(["", "/", "//"]),
        number,
    )
    return st.one_of(structured, st.text(max_size=12))


@pytest.fixture
def occupied_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_the_history_flag_takes_any_text(write_worker, occupied_port):
    """Parsed into a valid History or a usage error (2); a parsed one runs, failing only at bind (1).

    A prefix the engine cannot take (a lone surrogate, as undecodable argv bytes give) is
    refused by run() (1) too.
    """
    parser = cli.build_parser()
    worker = str(write_worker(WORKER))

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(text=flag_texts())
    def check(text):
        try:
            args = parser.parse_args(["w.py", "--history", text])
        except SystemExit as exited:
            assert exited.code == 2
            return
        [(prefix, policy)] = args.history.items()
        assert prefix == text.rpartition("=")[0]
        assert type(policy) is History and policy.size >= 1 and 0 < policy.ttl <= MAX_SECONDS
        root = logging.getLogger()
        saved = (root.level, list(root.handlers))
        try:
            with pytest.raises(SystemExit) as exited:
                cli.main([worker, "--bind", f"127.0.0.1:{occupied_port}", "--history", text])
            assert exited.value.code == 1
        finally:
            root.setLevel(saved[0])
            root.handlers[:] = saved[1]

    with contextlib.redirect_stderr(io.StringIO()):
        check()
