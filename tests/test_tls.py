"""TLS (docs/api.md#tls): wss:// and https:// with a test CA made at test time (trustme).

Real clients only: the ``websockets`` client over ``wss://``, ``urllib`` over
``https://``, raw sockets for plain HTTP and stalled handshakes, the CLI in a
subprocess, and headless Chromium loading the chat over https and talking over wss.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import socket
import ssl
import time
import urllib.request

import pytest
import trustme
import warpsocket
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from helpers import (
    ECHO_WORKER,
    ServerProcess,
    connect,
    expect_close,
    free_port,
    http_request_bytes,
    new_chat_room,
    upgrade_headers,
    wait_for,
    wait_no_warpsocket_threads,
    warpsocket_command,
)
from websockets.exceptions import InvalidStatus

CHANNEL_WORKER = """
import warpsocket

def handle_text_message(text, socket_id):
    command, _, rest = text.partition(":")
    if command == "join":
        warpsocket.subscribe(socket_id, rest)
        warpsocket.send(socket_id, "joined " + rest)
    elif command == "say":
        channel, _, message = rest.partition(":")
        warpsocket.send(channel, message)
    else:
        warpsocket.send(socket_id, text)

def handle_binary_message(data, socket_id):
    warpsocket.send(socket_id, data)
"""

#: The first bytes of a TLS ClientHello record, and nothing after them.
PARTIAL_CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01"
#: The server's upgrade time limit (not configurable from Python), which covers TLS.
HANDSHAKE_LIMIT = 10.0


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def cert_files(ca, tmp_path):
    """``cert_files(leaf=None) -> (cert_path, key_path)`` of ``leaf`` (default: for localhost)."""

    def _files(leaf=None, name="server"):
        leaf = leaf or ca.issue_cert("localhost", "127.0.0.1")
        cert, key = tmp_path / f"{name}-chain.pem", tmp_path / f"{name}-key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return str(cert), str(key)

    return _files


@pytest.fixture
def client_context(ca):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def tls_server(start_server, cert_files):
    """``tls_server(source=None, **start_kwargs) -> Server`` speaking TLS with a localhost leaf."""

    def _start(source=None, **kwargs):
        cert, key = cert_files()
        return start_server(source, tls_cert=cert, tls_key=key, **kwargs)

    return _start


def wss(server, path="/"):
    return f"wss://localhost:{server.port}{path}"


def test_wss_echo_large_messages_and_channels(tls_server, client_context):
    server = tls_server(CHANNEL_WORKER)
    with connect(wss(server), ssl=client_context) as alice, connect(wss(server), ssl=client_context) as bob:
        alice.send("hello")
        assert alice.recv(timeout=20) == "hello"
        # Several TLS records each way, and more than TCP takes at once.
        for size in (16 * 1024, 3 * 1024 * 1024):
            blob = bytes(range(256)) * (size // 256)
            bob.send(blob)
            assert bob.recv(timeout=60) == blob
        for ws in (alice, bob):
            ws.send("join:room")
            assert ws.recv(timeout=20) == "joined room"
        alice.send("say:room:hi everyone")
        assert alice.recv(timeout=20) == "hi everyone"
        assert bob.recv(timeout=20) == "hi everyone"


BURST_WORKER = """
import warpsocket

def handle_text_message(text, socket_id):
    # "burst:COUNT:LARGE": COUNT numbered messages of varied sizes sent in one
    # go, so the writer holds many frames per pass (several TLS records' worth,
    # frames cut at record boundaries), with a message of LARGE bytes amid them.
    _, count, large = text.split(":")
    count, large = int(count), int(large)
    for i in range(count):
        if i == count // 2 and large:
            warpsocket.send(socket_id, bytes(range(256)) * (large // 256))
        warpsocket.send(socket_id, f"{i}:" + "x" * (i % 300))
    warpsocket.send(socket_id, "done")
"""


def _expect_burst(ws, count: int, large: int) -> None:
    """The burst of ``BURST_WORKER`` arrives whole and in order."""
    for i in range(count):
        if i == count // 2 and large:
            assert ws.recv(timeout=60) == bytes(range(256)) * (large // 256)
        assert ws.recv(timeout=60) == f"{i}:" + "x" * (i % 300)
    assert ws.recv(timeout=60) == "done"


def test_wss_burst_of_small_messages_arrives_whole_and_in_order(tls_server, client_context):
    server = tls_server(BURST_WORKER)
    with connect(wss(server), ssl=client_context) as ws:
        # About 470 KB of small frames: many full 16 KB records, and the
        # client reads slower than the server queues.
        for _ in range(2):
            ws.send("burst:3000:0")
            _expect_burst(ws, 3000, 0)


def test_wss_large_message_amid_a_burst_arrives_whole_and_in_order(tls_server, client_context):
    server = tls_server(BURST_WORKER)
    with connect(wss(server), ssl=client_context) as ws:
        # A frame larger than a record between small ones, and one of a
        # few records' size that a gathered write can cut.
        for large in (2 * 1024 * 1024, 40 * 1024 + 256):
            ws.send(f"burst:500:{large}")
            _expect_burst(ws, 500, large)


def test_shutdown_closes_wss_connections_with_1001(tls_server, client_context):
    server = tls_server()
    ws = connect(wss(server), ssl=client_context)
    ws.send("ping")
    assert ws.recv(timeout=20) == "ping"
    server.stop(timeout=10)
    assert expect_close(ws) == (1001, "server shutdown")


def test_static_files_over_https(tls_server, client_context, tmp_path):
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<h1>over TLS</h1>")
    server = tls_server(static_dir=str(static))
    url = f"https://localhost:{server.port}/index.html"
    with urllib.request.urlopen(url, context=client_context, timeout=30) as response:
        assert response.status == 200
        assert response.read() == b"<h1>over TLS</h1>"
    # The same port still upgrades wss:// connections.
    with connect(wss(server), ssl=client_context) as ws:
        ws.send("still a websocket")
        assert ws.recv(timeout=20) == "still a websocket"


def read_all(sock, timeout=20.0):
    """What the peer sends until it closes (a reset counts as the end)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_plain_http_to_a_tls_port_gets_400_or_nothing(tls_server):
    server = tls_server()
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{server.port}/")
    assert refused.value.response.status_code == 400
    for request in (
        http_request_bytes("/", upgrade_headers(), server.port),
        http_request_bytes("/", {}, server.port),
    ):
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(request)
            response = read_all(sock)
        assert response == b"" or response.startswith(b"HTTP/1.1 400 "), response
        assert b" 101 " not in response and b" 426 " not in response


def test_client_refuses_an_expired_certificate(ca, start_server, cert_files, client_context):
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = ca.issue_cert(
        "localhost", not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1)
    )
    cert, key = cert_files(expired)
    server = start_server(tls_cert=cert, tls_key=key)
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        connect(wss(server), ssl=client_context)


def test_client_refuses_a_certificate_for_another_host(ca, start_server, cert_files, client_context):
    cert, key = cert_files(ca.issue_cert("example.com"))
    server = start_server(tls_cert=cert, tls_key=key)
    with pytest.raises(ssl.SSLCertVerificationError, match="[Hh]ostname mismatch"):
        connect(wss(server), ssl=client_context)


def test_client_refuses_a_certificate_of_an_unknown_ca(tls_server):
    server = tls_server()
    with pytest.raises(ssl.SSLCertVerificationError, match="self-signed|unable to get local issuer"):
        connect(wss(server), ssl=ssl.create_default_context())


@pytest.mark.parametrize(
    "case, argument",
    [
        ("cert only", "tls_key"),
        ("key only", "tls_cert"),
        ("cert missing", "tls_cert"),
        ("key missing", "tls_key"),
        ("cert not PEM", "tls_cert"),
        ("key not PEM", "tls_key"),
        ("key of another certificate", "tls_key"),
    ],
)
def test_unusable_tls_arguments_raise_value_error_naming_them(
    case, argument, ca, cert_files, write_worker, tmp_path
):
    cert, key = cert_files()
    _, other_key = cert_files(name="other")
    missing = str(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    arguments = {
        "cert only": {"tls_cert": cert},
        "key only": {"tls_key": key},
        "cert missing": {"tls_cert": missing, "tls_key": key},
        "key missing": {"tls_cert": cert, "tls_key": missing},
        "cert not PEM": {"tls_cert": str(garbage), "tls_key": key},
        "key not PEM": {"tls_cert": cert, "tls_key": str(garbage)},
        "key of another certificate": {"tls_cert": cert, "tls_key": other_key},
    }[case]
    port = free_port()
    worker = write_worker("def handle_text_message(text, socket_id):\n    pass\n")
    with pytest.raises(ValueError, match=f"^{argument}") as raised:
        warpsocket.start(bind=f"127.0.0.1:{port}", worker=str(worker), **arguments)
    given = arguments.get(argument)
    if given is not None:
        assert given in str(raised.value)
    # Nothing is left running, the port is free, and a server can start.
    wait_no_warpsocket_threads()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))
    warpsocket.start(bind=f"127.0.0.1:{port}", worker=str(worker), threads=1).stop()


def test_tls_arguments_must_be_paths(write_worker):
    worker = write_worker("def handle_text_message(text, socket_id):\n    pass\n")
    with pytest.raises(TypeError, match="tls_cert"):
        warpsocket.start(bind="127.0.0.1:0", worker=str(worker), tls_cert=3, tls_key="key.pem")


@pytest.mark.timeout(90)
def test_stalled_and_garbled_handshakes_are_dropped_and_block_nobody(tls_server, client_context):
    server = tls_server()
    started = time.monotonic()
    stalled = []
    for first_bytes in (b"", PARTIAL_CLIENT_HELLO):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(first_bytes)
        stalled.append(sock)
    # Garbage after a ClientHello's record header ends the handshake at once.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as garbled:
        garbled.sendall(b"\x16\x03\x01\x00\x10" + b"\xff" * 16)
        assert b"HTTP" not in read_all(garbled)
    assert time.monotonic() - started < HANDSHAKE_LIMIT
    # Meanwhile a prompt client is served.
    with connect(wss(server), ssl=client_context) as ws:
        ws.send("served")
        assert ws.recv(timeout=20) == "served"
    # The stalled ones are dropped at the upgrade's time limit, with nothing sent.
    for sock in stalled:
        assert read_all(sock, timeout=HANDSHAKE_LIMIT + 30) == b""
        sock.close()
    waited = time.monotonic() - started
    assert HANDSHAKE_LIMIT - 1 < waited < HANDSHAKE_LIMIT + 10, waited


def test_stalled_tls_handshakes_make_room_for_newcomers(tls_server, client_context):
    server = tls_server(max_pending_upgrades=2)
    stalled = []
    try:
        for _ in range(6):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            sock.sendall(PARTIAL_CLIENT_HELLO)
            stalled.append(sock)
        # Long before the time limit, a prompt client gets a slot of its own.
        started = time.monotonic()
        with connect(wss(server), ssl=client_context, open_timeout=HANDSHAKE_LIMIT / 2) as ws:
            ws.send("room for me")
            assert ws.recv(timeout=20) == "room for me"
        assert time.monotonic() - started < HANDSHAKE_LIMIT / 2
    finally:
        for sock in stalled:
            sock.close()


def test_cli_serves_wss(cert_files, client_context, write_worker, tmp_path):
    cert, key = cert_files()
    worker = write_worker(ECHO_WORKER)
    port = free_port()
    bind = f"127.0.0.1:{port}"
    proc = ServerProcess(
        warpsocket_command(worker, "--bind", bind, "--tls-cert", cert, "--tls-key", key), port=port
    )
    try:
        proc.wait_listening()
        with connect(f"wss://localhost:{port}/", ssl=client_context) as ws:
            ws.send("over the CLI")
            assert ws.recv(timeout=20) == "over the CLI"
    finally:
        proc.stop()
    assert proc.proc.returncode == 0, proc.output()

    lone = ServerProcess(warpsocket_command(worker, "--bind", bind, "--tls-cert", cert))
    assert lone.wait(60) == 1
    assert "tls_key is missing" in lone.output()


# --------------------------------------------------------------------------
# the chat in headless Chromium, over https and wss
# --------------------------------------------------------------------------


def spki_sha256(cert_pem: bytes) -> str:
    """Base64 SHA-256 of a certificate's public key (Chromium's SPKI pin format)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.mark.timeout(300)
def test_chat_in_chromium_over_https_and_wss(ca, start_server, cert_files, tmp_path):
    from test_chat_browser import CHAT_HISTORY, CHAT_STATIC, CHAT_WORKER, Page, chromium, require_browser

    require_browser()

    leaf = ca.issue_cert("localhost")
    cert, key = cert_files(leaf)
    server = start_server(
        worker=str(CHAT_WORKER), static_dir=str(CHAT_STATIC), history=CHAT_HISTORY, tls_cert=cert, tls_key=key
    )
    # Chromium trusts exactly this key (certificate errors for any other stay fatal),
    # without a global "ignore certificate errors".
    pin = spki_sha256(leaf.cert_chain_pems[0].bytes())
    drivers = []

    def open_page(label):
        driver = chromium(tmp_path / f"profile-{label}", f"--ignore-certificate-errors-spki-list={pin}")
        drivers.append(driver)
        driver.get(f"https://localhost:{server.port}/")
        return Page(driver)

    try:
        room = new_chat_room()
        alice, bob = open_page("alice"), open_page("bob")
        for page in (alice, bob):
            assert page.js("return location.protocol") == "https:"
        alice.login("alice")
        bob.login("bob")
        alice.join(room)
        bob.join(room)
        alice.wait_members(["alice", "bob"])
        alice.say("hello over wss")
        bob.wait_message("hello over wss")
        bob.say("hi alice")
        alice.wait_message("hi alice")
        assert alice.console_errors() == []
        assert bob.console_errors() == []
        # Both pages' WebSockets are this server's (a port that speaks only TLS).
        wait_for(lambda: sum(w["connections"] for w in server.stats_workers()) == 2, message="2 connections")
    finally:
        for driver in drivers:
            try:
                driver.quit()
            except Exception:  # already gone
                pass
