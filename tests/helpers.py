"""Helpers shared by the WarpSocket end-to-end tests (imported as ``helpers``)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import inspect
import itertools
import logging
import os
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import warpsocket
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

_SYNC_CONNECT_HAS_LEGACY = "legacy" in inspect.signature(sync_connect).parameters

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# --------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------


def wait_for(cond, timeout=20.0, interval=0.02, message="condition"):
    """Poll ``cond()`` until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def warpsocket_threads():
    return [t for t in threading.enumerate() if t.name.startswith("warpsocket-") and t.is_alive()]


def wait_no_warpsocket_threads(timeout=20.0):
    deadline = time.monotonic() + timeout
    while warpsocket_threads():
        if time.monotonic() > deadline:
            names = [t.name for t in warpsocket_threads()]
            raise AssertionError(f"warpsocket threads still alive: {names}")
        time.sleep(0.02)


def free_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def can_bind_ipv6_loopback():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def tcp_connectable(host, port, timeout=1.0):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_lines(path):
    """The complete lines of a log that workers append to; a last line that is still
    being written (no newline yet) is left out, so a reader never parses half of one."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [line for line in complete.splitlines() if line]


def ws_url(server, path="/", host="127.0.0.1", port=None):
    if port is None:
        port = server.port
    if ":" in host:
        host = f"[{host}]"
    return f"ws://{host}:{port}{path}"


def _tls_after_tickets(url, context, timeout):
    """A TLS connection to a ``wss://`` URL's host, handshake done and, over TLS 1.3,
    the server's session tickets taken in.

    The sync client reads in a background thread while the caller's thread sends the
    upgrade request; over TLS 1.3 the server's session tickets arrive just then, and
    CPython's ``SSLSocket`` does not guard one SSL object against a read and a write at
    once: about 1 connection in 1,000 never sent its request (seen on the wire: the
    client's Finished and nothing after, against every server build). Taking the tickets
    in first leaves the reader nothing to process but the server's answer."""
    parts = urllib.parse.urlsplit(url)
    raw = socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout)
    try:
        tls = context.wrap_socket(raw, server_hostname=parts.hostname)
    except BaseException:
        raw.close()
        raise
    if tls.version() == "TLSv1.3":
        deadline = time.monotonic() + timeout
        tls.setblocking(False)
        try:
            while not (tls.session is not None and tls.session.has_ticket):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break  # a server that sends no tickets: nothing to race with
                select.select([tls], [], [], min(remaining, 0.1))
                with contextlib.suppress(ssl.SSLWantReadError):
                    if tls.recv(1):
                        raise AssertionError("the server spoke before the upgrade request")
        except BaseException:
            tls.close()
            raise
        tls.settimeout(timeout)
    return tls


def connect(server_or_url, path="/", **kwargs):
    """Synchronous websockets client with generous, test-friendly settings."""
    url = server_or_url if isinstance(server_or_url, str) else ws_url(server_or_url, path)
    kwargs.setdefault("open_timeout", 30)
    if url.startswith("wss://") and "sock" not in kwargs:
        context = kwargs.pop("ssl", None) or ssl.create_default_context()
        kwargs["sock"] = _tls_after_tickets(url, context, kwargs["open_timeout"])
        url = "ws://" + url.removeprefix("wss://")
    kwargs.setdefault("close_timeout", 10)
    kwargs.setdefault("ping_interval", None)
    kwargs.setdefault("compression", None)
    kwargs.setdefault("proxy", None)
    kwargs.setdefault("max_size", None)
    if _SYNC_CONNECT_HAS_LEGACY:
        # websockets >= 17 wants connect() used as a context manager unless legacy=True;
        # the connection object returned here is a context manager itself either way.
        kwargs.setdefault("legacy", True)
    return sync_connect(url, **kwargs)


def async_connect_kwargs(**kwargs):
    kwargs.setdefault("open_timeout", 60)
    kwargs.setdefault("close_timeout", 20)
    kwargs.setdefault("ping_interval", None)
    kwargs.setdefault("compression", None)
    kwargs.setdefault("proxy", None)
    kwargs.setdefault("max_size", None)
    return kwargs


def recv(ws, timeout=20.0):
    return ws.recv(timeout=timeout)


def expect_close(ws, timeout=20.0):
    """Read (and discard) messages until the connection closes.

    Returns ``(code, reason)`` of the close frame received from the server, or
    ``(None, None)`` when the server dropped the connection without one.
    """
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("connection was not closed by the server in time")
            ws.recv(timeout=remaining)
    except TimeoutError:
        raise AssertionError("connection was not closed by the server in time") from None
    except ConnectionClosed as exc:
        if exc.rcvd is None:
            return (None, None)
        return (exc.rcvd.code, exc.rcvd.reason)


def ask(ws, question, timeout=20.0):
    ws.send(question)
    return ws.recv(timeout=timeout)


# --------------------------------------------------------------------------
# raw WebSocket client (hand-built frames)
# --------------------------------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def build_frame(opcode, payload=b"", *, fin=True, mask=True, rsv=0, mask_key=None):
    if isinstance(payload, str):
        payload = payload.encode()
    first = (0x80 if fin else 0) | ((rsv & 0x7) << 4) | (opcode & 0xF)
    length = len(payload)
    mask_bit = 0x80 if mask else 0
    if length < 126:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    if not mask:
        return header + payload
    key = mask_key if mask_key is not None else os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return header + key + masked


def close_payload(code=1000, reason=""):
    return struct.pack("!H", code) + reason.encode()


def http_request_bytes(path="/", headers=None, port=0):
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def upgrade_headers(key=None, **overrides):
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key or base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    for name, value in overrides.items():
        name = name.replace("_", "-")
        # allow removing a header by passing None
        for existing in list(headers):
            if existing.lower() == name.lower():
                del headers[existing]
        if value is not None:
            headers[name] = value
    return headers


class RawConn:
    """A plain TCP socket speaking just enough WebSocket/HTTP for the tests."""

    def __init__(self, port, host="127.0.0.1", timeout=20.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.port = port

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def sendall(self, data):
        self.sock.sendall(data)

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed by peer")
        self.buf += chunk

    def recv_exact(self, n):
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_http_response(self):
        """Return ``(status, headers, body)``; header names are lower-cased."""
        while b"\r\n\r\n" not in self.buf:
            try:
                self._fill()
            except EOFError:
                if not self.buf:
                    raise
                raise AssertionError(f"incomplete HTTP response: {self.buf!r}") from None
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status_line = lines[0]
        parts = status_line.split(" ", 2)
        assert parts[0].startswith("HTTP/1."), f"not an HTTP response: {status_line!r}"
        status = int(parts[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = b""
        length = int(headers.get("content-length", "0") or 0)
        if length:
            body = self.recv_exact(length)
        return status, headers, body

    def handshake(self, path="/", extra_headers=None):
        key = base64.b64encode(os.urandom(16)).decode()
        headers = upgrade_headers(key)
        headers.update(extra_headers or {})
        self.sendall(http_request_bytes(path, headers, self.port))
        status, resp_headers, _ = self.read_http_response()
        assert status == 101, f"handshake failed with HTTP {status}"
        expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        assert resp_headers.get("sec-websocket-accept") == expected
        return resp_headers

    def send_frame(self, opcode, payload=b"", **kwargs):
        self.sendall(build_frame(opcode, payload, **kwargs))

    def read_frame(self):
        """Return ``(fin, opcode, payload)`` of the next frame from the server."""
        b0, b1 = self.recv_exact(2)
        fin = bool(b0 & 0x80)
        opcode = b0 & 0x0F
        assert not (b1 & 0x80), "server frames must not be masked"
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self.recv_exact(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self.recv_exact(8))
        return fin, opcode, self.recv_exact(length)

    def read_message(self):
        """Read one complete data message (answering nothing); returns (opcode, payload)."""
        parts = []
        msg_opcode = None
        while True:
            fin, opcode, payload = self.read_frame()
            if opcode in (OP_PING, OP_PONG):
                continue
            if opcode == OP_CLOSE:
                raise AssertionError(f"unexpected close frame {payload!r}")
            if opcode != OP_CONT:
                msg_opcode = opcode
            parts.append(payload)
            if fin:
                return msg_opcode, b"".join(parts)

    def read_close(self):
        """Read frames until a close frame; return ``(code, reason)``.

        Returns ``(None, None)`` if the TCP connection ends without a close frame.
        """
        try:
            while True:
                _fin, opcode, payload = self.read_frame()
                if opcode == OP_CLOSE:
                    if len(payload) >= 2:
                        (code,) = struct.unpack("!H", payload[:2])
                        return code, payload[2:].decode("utf-8", "replace")
                    return 1005, ""
        except (EOFError, ConnectionResetError):
            return (None, None)

    def wait_eof(self, timeout=20.0):
        """True when the server closes the TCP connection within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


# --------------------------------------------------------------------------
# chat example rooms
# --------------------------------------------------------------------------

_chat_rooms = []


def new_chat_room():
    """A room name of its own for the chat example (examples/chat/worker.py).

    Every test gets rooms of its own, so that nothing a test left (in Redis, say) shows
    in the next one; :func:`forget_chat_rooms` (run by conftest after each test) forgets them.
    """
    room = "r" + uuid.uuid4().hex[:8]
    _chat_rooms.append(room)
    return room


def forget_chat_rooms():
    _chat_rooms.clear()


# --------------------------------------------------------------------------
# server processes (the CLI, or a script calling run())
# --------------------------------------------------------------------------


def warpsocket_command(*args):
    """``python -m warpsocket ARGS...`` as an argv list."""
    return [sys.executable, "-m", "warpsocket", *(str(a) for a in args)]


class ServerProcess:
    """A server in a subprocess (``argv``, e.g. :func:`warpsocket_command`), its output read into memory."""

    def __init__(self, argv, cwd=None, port=None):
        self.port = port
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.stdout = []
        self.stderr = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, sink):
        for line in stream:
            sink.append(line)

    def output(self):
        return "".join(self.stdout) + "".join(self.stderr)

    def wait_listening(self, port=None, timeout=60):
        """Wait until ``port`` (default: the one given at start) accepts TCP connections."""
        port = self.port if port is None else port

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early with {self.proc.returncode}:\n{self.output()}")
            return tcp_connectable("127.0.0.1", port, timeout=0.5)

        wait_for(ready, timeout=timeout, interval=0.1, message=f"server to listen on port {port}")

    def wait(self, timeout):
        """Wait for the process to exit; return its exit code once its output is read."""
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc

    def stop(self, timeout=30):
        """SIGTERM (graceful), then kill if it does not exit within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        for t in self._threads:
            t.join(5)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(Exception):
                self.proc.wait(10)
        for t in self._threads:
            t.join(5)


# --------------------------------------------------------------------------
# worker sources used by many tests
# --------------------------------------------------------------------------

ECHO_WORKER = """
import warpsocket

def handle_text_message(text, socket_id):
    if text == "sid?":
        warpsocket.send(socket_id, str(socket_id))
    else:
        warpsocket.send(socket_id, text)

def handle_binary_message(data, socket_id):
    warpsocket.send(socket_id, data)
"""

# handle_start(worker_arg) receives the path of a log file; helper `log` appends a line.
# A worker that does more in handle_start defines its own, setting LOG first.
LOGGING_PRELUDE = """
import os, threading
import warpsocket

LOG = None
_LOG_LOCK = threading.Lock()

def handle_start(worker_arg):
    global LOG
    LOG = worker_arg

def log(*parts):
    line = " ".join(str(p) for p in parts)
    with _LOG_LOCK:
        with open(LOG, "a") as f:
            f.write(line + "\\n")
            f.flush()
"""


_sentinels = itertools.count()


class IdClient:
    """A connected client that knows its socket id (its worker answers "id" with it)."""

    def __init__(self, server, path="/"):
        self.ws = connect(server, path)
        self.sid = int(ask(self.ws, "id", timeout=30))

    def recv(self, timeout=20.0):
        return self.ws.recv(timeout=timeout)

    def received(self, timeout=20.0):
        """Everything that arrives before a sentinel sent now from this thread."""
        token = f"~sentinel~{next(_sentinels)}~"
        assert warpsocket.send(self.sid, token) == 1
        out = []
        while True:
            message = self.ws.recv(timeout=timeout)
            if message == token:
                return out
            out.append(message)

    def close(self):
        self.ws.close()


class LogCollector(logging.Handler):
    """Collects every record emitted on the ``warpsocket`` logger (from any thread)."""

    _format = logging.Formatter("%(levelname)s %(name)s %(message)s")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def errors(self):
        """ERROR records as text, with their traceback or stack when they carry one."""
        return [self._format.format(r) for r in list(self.records) if r.levelno >= logging.ERROR]

    def errors_containing(self, needle):
        return [text for text in self.errors() if needle in text]


# An echo worker that also answers "sid?" and logs open/close to the file in worker_arg.
LOGGING_ECHO_WORKER = (
    LOGGING_PRELUDE
    + ECHO_WORKER
    + """
def handle_open(socket_id, ip, headers):
    log("open", socket_id)
    return True

def handle_close(socket_id):
    log("close", socket_id)
"""
)


REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


class Redis:
    """A private ``redis-server`` on a free port, without persistence."""

    def __init__(self, workdir):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc = None
        self.start()

    def start(self):
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir)]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self.cli("PING") == "PONG", timeout=30, message="redis-server to answer")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def cli(self, *args):
        result = subprocess.run(
            [REDIS_CLI, "-p", str(self.port), *args], capture_output=True, text=True, timeout=10
        )
        return result.stdout.strip()

    def listeners(self, channel):
        """How many connections (nodes) listen on a WarpSocket channel's Redis channel."""
        out = self.cli("PUBSUB", "NUMSUB", f"warpsocket:c:{channel}").splitlines()
        return int(out[1]) if len(out) == 2 else -1
