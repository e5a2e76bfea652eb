"""The README's "Recovering after a reconnect" example, run: examples/recovery/.

The server is examples/recovery/worker.py with the ``history`` option (from the command
line as the README starts it, and from ``start()``); the clients are the README's own code:
the Python ``Follower`` of examples/recovery/client.py, and static/client.js in headless
Chromium. A TCP proxy between client and server cuts the client's connection (a network
blip, neither side saying goodbye) and can hold its reconnect while messages are sent, so
that the client has surely missed some. The README must show these files' code verbatim.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import warpsocket
from helpers import ServerProcess, connect, free_port, wait_for, warpsocket_command

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "recovery"
WORKER = EXAMPLE / "worker.py"
CLIENT = EXAMPLE / "client.py"
CLIENT_JS = EXAMPLE / "static" / "client.js"
README = ROOT / "README.md"
WAIT = 60  # seconds: generous, the CI box has two loaded cores


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


client = load(CLIENT, "recovery_client")
ROOM = load(WORKER, "recovery_worker").ROOM


class Proxy:
    """A TCP proxy to ``port`` whose connections the test cuts, and whose new ones it holds."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.holding = threading.Event()
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.threads = [threading.Thread(target=self._accept, name="test-proxy-accept")]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            if self.holding.is_set():
                # The client's connect completes in the kernel's backlog; its upgrade waits.
                self.closed.wait(0.05)
                continue
            try:
                near, _ = self.listener.accept()
            except TimeoutError:
                continue
            far = socket.create_connection(("127.0.0.1", self.upstream))
            with self.lock:
                self.accepted += 1
                self.pairs.append((near, far))
                for source, sink in ((near, far), (far, near)):
                    pump = threading.Thread(target=self._pump, args=(source, sink), name="test-proxy-pump")
                    self.threads.append(pump)
                    pump.start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def cut(self, hold: bool = False) -> None:
        """Ends every proxied connection at once; with ``hold``, new ones wait for :meth:`release`."""
        if hold:
            self.holding.set()
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def release(self) -> None:
        self.holding.clear()

    def close(self) -> None:
        self.release()
        self.closed.set()
        self.cut()
        for thread in list(self.threads):
            thread.join(WAIT)
        self.listener.close()


@contextlib.contextmanager
def proxy_to(port: int):
    proxy = Proxy(port)
    try:
        yield proxy
    finally:
        proxy.close()


class Running:
    """``follower.run()`` on an asyncio loop of its own thread, until :meth:`stop`."""

    def __init__(self, follower) -> None:
        self.follower = follower
        self.loop = asyncio.new_event_loop()
        self.task = self.loop.create_task(follower.run())
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-follower")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # reported by stop()
            self.error = exc
        finally:
            self.loop.close()

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed already: run() failed
            self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        assert self.error is None, repr(self.error)


@contextlib.contextmanager
def following(url: str):
    follower = client.Follower(url)
    running = Running(follower)
    try:
        yield follower
    finally:
        running.stop()


def wait_shown(follower, expected: list[str]) -> None:
    """Waits until the follower shows ``expected``, then checks nothing else comes after it."""
    try:
        wait_for(lambda: follower.shown[: len(expected)] == expected, timeout=WAIT, message="messages")
    except AssertionError:
        pytest.fail(f"shown {follower.shown!r}, expected {expected!r}")
    assert follower.shown == expected


# ---------------------------------------------------------------- the Python client


@pytest.mark.timeout(240)
def test_python_client_gets_every_message_once_in_order_across_drops(tmp_path):
    """The README's command line, and a client whose connection drops five times mid-stream."""
    port = free_port()
    argv = warpsocket_command(WORKER, "--bind", f"127.0.0.1:{port}", "--history", "room:=5000/300")
    server = ServerProcess(argv, cwd=tmp_path, port=port)
    try:
        server.wait_listening()
        with proxy_to(port) as proxy, following(f"ws://127.0.0.1:{proxy.port}/") as follower:
            wait_for(lambda: follower.epoch, timeout=WAIT, message="the first answer")
            assert follower.shown == []
            sent: list[str] = []
            with connect(f"ws://127.0.0.1:{port}/") as sender:

                def say(text: str) -> None:
                    sender.send(f'{{"type": "say", "text": "{text}"}}')
                    sent.append(text)

                for round_ in range(5):
                    # Cut while this round's first burst is on its way ...
                    for i in range(60):
                        say(f"r{round_}-a{i}")
                    first = f"r{round_}-a0"
                    wait_for(lambda first=first: first in follower.shown, timeout=WAIT, message=first)
                    proxy.cut(hold=True)
                    # ... and send a second one while the client surely cannot be reached.
                    for i in range(40):
                        say(f"r{round_}-b{i}")
                    proxy.release()
                    wait_for(lambda round_=round_: proxy.accepted == round_ + 2, timeout=WAIT)
                say("end")
                wait_shown(follower, sent)
            # Nothing was shown twice or lost, and not from a page: the client resumed each time.
            assert len(sent) == 501
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.output()


@pytest.mark.timeout(120)
def test_python_client_restarted_resumes_or_gets_the_latest_page(start_server):
    """A client stopped and started again keeps its place, or gets the page when too much was missed."""
    server = start_server(worker=str(WORKER), history={"room:": warpsocket.History(5)})
    url = f"ws://127.0.0.1:{server.port}/"
    follower = client.Follower(url)

    def run_until(expected: list[str]) -> None:
        running = Running(follower)
        try:
            wait_for(lambda: follower.epoch, timeout=WAIT, message="the first answer")
            wait_shown(follower, expected)
        finally:
            running.stop()

    run_until([])
    epoch = follower.epoch
    assert epoch == warpsocket.position(ROOM)[0]
    # Stopped: what it missed is kept, so it resumes.
    for i in range(3):
        warpsocket.send(ROOM, f"a{i}")
    run_until(["a0", "a1", "a2"])
    # Stopped: ten more messages, of which the room keeps five. recover() is False, the
    # client gets the page and the view starts again from it.
    for i in range(10):
        warpsocket.send(ROOM, f"b{i}")
    run_until([f"b{i}" for i in range(5, 10)])
    assert (follower.epoch, follower.offset) == (epoch, 13)
    # Stopped again, missing no more than is kept: resumed where it was.
    for i in range(2):
        warpsocket.send(ROOM, f"c{i}")
    run_until([f"b{i}" for i in range(5, 10)] + ["c0", "c1"])
    assert (follower.epoch, follower.offset) == (epoch, 15)


# ---------------------------------------------------------------- the README


def readme_blocks() -> dict[str, str]:
    """The README's code blocks announced by ``<!-- examples/recovery/NAME -->``."""
    pattern = re.compile(r"<!-- (examples/recovery/\S+) -->\n```\w*\n(.*?)```\n", re.S)
    return {path: code for path, code in pattern.findall(README.read_text())}


def test_readme_shows_the_example_files_verbatim():
    blocks = readme_blocks()
    assert sorted(blocks) == [
        "examples/recovery/client.py",
        "examples/recovery/static/client.js",
        "examples/recovery/worker.py",
    ]
    for path, code in blocks.items():
        text = (ROOT / path).read_text()
        assert code in text, f"README's block for {path} is not in the file"
    # Everything that matters is in what the README shows.
    assert "def handle_text_message" in blocks["examples/recovery/worker.py"]
    for name in ("class Follower", "def show", "async def run", "def answered"):
        assert name in blocks["examples/recovery/client.py"]
    assert blocks["examples/recovery/static/client.js"] == CLIENT_JS.read_text()
    assert "docs/api.md#history" in README.read_text().split("## Recovering after a reconnect")[1]


def test_the_javascript_parses():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    result = subprocess.run([node, "--check", str(CLIENT_JS)], capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- the JavaScript client


@pytest.mark.timeout(300)
def test_browser_client_gets_every_message_once_in_order_across_drops(start_server, tmp_path):
    from test_chat_browser import chromium, require_browser

    require_browser()
    server = start_server(
        worker=str(WORKER), static_dir=str(EXAMPLE / "static"), history={"room:": warpsocket.History(1000)}
    )
    shown = "return [...document.querySelectorAll('#messages li')].map((li) => li.textContent)"
    with proxy_to(server.port) as proxy:
        driver = chromium(tmp_path / "profile")
        try:
            driver.get(f"http://127.0.0.1:{proxy.port}/")
            # The page and the WebSocket came through the proxy, in one or two connections.
            wait_for(lambda: driver.execute_script("return epoch"), timeout=WAIT, message="the answer")
            sent: list[str] = []
            for round_ in range(3):
                for i in range(30):
                    sent.append(f"r{round_}-a{i}")
                    warpsocket.send(ROOM, sent[-1])
                wait_for(lambda: driver.execute_script(shown), timeout=WAIT)
                before = proxy.accepted
                proxy.cut(hold=True)
                for i in range(20):
                    sent.append(f"r{round_}-b{i}")
                    warpsocket.send(ROOM, sent[-1])
                proxy.release()
                wait_for(lambda before=before: proxy.accepted > before, timeout=WAIT, message="reconnect")
            sent.append("end")
            warpsocket.send(ROOM, "end")
            wait_for(lambda: driver.execute_script(shown)[-1:] == ["end"], timeout=WAIT, message="end")
            assert driver.execute_script(shown) == sent
            assert driver.execute_script("return [epoch, offset]") == list(warpsocket.position(ROOM))
        finally:
            driver.quit()
