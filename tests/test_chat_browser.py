"""The chat example in a real browser: headless Chromium driven by Selenium.

WarpSocket serves the page (``static_dir``) and the WebSocket on one port. Uses the
system's ``chromium`` and ``chromium-driver`` (Debian packages) and the ``selenium``
package; it never downloads a browser or a driver (the driver path is given
explicitly, so Selenium Manager does not run). Without them the tests skip, except
under CI (``CI`` set), where they fail. The cluster test also needs ``redis-server``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import ServerProcess, free_port, new_chat_room, wait_for, warpsocket_command
from test_chat import CHAT_HISTORY, Chat

ROOT = Path(__file__).resolve().parent.parent
CHAT_WORKER = ROOT / "examples" / "chat" / "worker.py"
CHAT_STATIC = ROOT / "examples" / "chat" / "static"

CHROMIUM = os.environ.get("WARPSOCKET_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("WARPSOCKET_CHROMEDRIVER", "/usr/bin/chromedriver")
WAIT = 60  # seconds: generous, the CI box has two loaded cores

pytestmark = pytest.mark.timeout(300)


def missing_tools():
    problems = []
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            problems.append(f"{path} not found (apt-get install -y {package})")
    try:
        import selenium  # noqa: F401
    except ImportError:
        problems.append("the selenium package is not installed (pip install selenium)")
    return problems


def require_browser():
    """Skip (or, under CI, fail) a test when Chromium, its driver or Selenium is missing."""
    problems = missing_tools()
    if problems:
        message = "browser tests need Chromium, its driver and Selenium: " + "; ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def chromium(profile, *extra_args):
    """A headless Chromium (Selenium driver) with its own profile folder."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1200,800",
        f"--user-data-dir={profile}",
        *extra_args,
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    return driver


@pytest.fixture(scope="module")
def browser_tools():
    require_browser()


@pytest.fixture
def chat_server(browser_tools, start_server):
    return start_server(worker=str(CHAT_WORKER), static_dir=str(CHAT_STATIC), threads=2, history=CHAT_HISTORY)


@pytest.fixture
def open_page(browser_tools, request, tmp_path):
    """``open_page(name, url=None) -> Page``: a fresh headless browser showing the chat.

    ``url`` defaults to the page of the test's ``chat_server``.
    """
    drivers = []

    def _open(label, url=None):
        if url is None:
            url = f"http://127.0.0.1:{request.getfixturevalue('chat_server').port}/"
        driver = chromium(tmp_path / f"profile-{label}-{len(drivers)}")
        drivers.append(driver)
        driver.get(url)
        return Page(driver, url)

    yield _open
    for driver in drivers:
        try:
            driver.quit()
        except Exception:  # already quit by the test
            pass
    shutil.rmtree(tmp_path, ignore_errors=True)


class Page:
    """One browser tab with the chat, read through small JavaScript snippets.

    The page re-renders lists wholesale, so state is read with ``execute_script``
    (atomic) rather than through element handles that may go stale. A browser with
    several tabs (:meth:`open_tab`) has a ``Page`` per tab, each switching the driver
    to its own tab before every command.
    """

    def __init__(self, driver, url=None, handle=None):
        self.driver = driver
        self.url = url  # the page's address, for open_tab (None: the one shown now)
        self.handle = handle  # None while the browser has this one tab
        self.name = None

    def focus(self):
        if self.handle is not None:
            self.driver.switch_to.window(self.handle)

    def open_tab(self, url=None):
        """A new tab of this browser showing the chat at ``url`` (default: this page's)."""
        self.focus()
        self.handle = self.driver.current_window_handle
        url = url or self.url or self.driver.current_url
        self.driver.switch_to.new_window("tab")
        self.driver.get(url)
        return Page(self.driver, url, self.driver.current_window_handle)

    def close_tab(self):
        """Close this tab (the browser and its other tabs stay)."""
        self.focus()
        self.driver.close()

    def js(self, script, *args):
        self.focus()
        return self.driver.execute_script(script, *args)

    def wait(self, condition, message, timeout=WAIT):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(
            lambda _driver: condition(), message=f"{self.name or 'page'}: {message}"
        )

    def type_into(self, element_id, text):
        from selenium.webdriver.common.by import By

        self.focus()
        element = self.driver.find_element(By.ID, element_id)
        element.clear()
        element.send_keys(text)

    def click(self, element_id):
        from selenium.webdriver.common.by import By

        self.focus()
        self.driver.find_element(By.ID, element_id).click()

    def online(self):
        return self.js("return document.getElementById('status').className.includes('online')")

    def login(self, name):
        self.wait(self.online, "connected")
        self.type_into("name-input", name)
        self.click("name-button")
        self.wait(lambda: self.js("return document.getElementById('me').textContent") == name, "logged in")
        self.wait(lambda: self.js("return !document.getElementById('chat').hidden"), "chat shown")
        self.name = name

    def join(self, room):
        self.type_into("room-input", room)
        self.click("join-button")
        self.wait(lambda: self.active_room() == room, f"#{room} active")
        self.wait(lambda: self.name in self.members(), f"in #{room}'s member list")

    def say(self, text):
        self.type_into("message-input", text)
        self.click("send-button")
        self.wait(lambda: text in self.messages(), f"own message {text!r} shown")

    def rooms(self):
        return self.js("return [...document.querySelectorAll('#rooms li')].map(li => li.dataset.room)")

    def active_room(self):
        return self.js("const li = document.querySelector('#rooms li.active'); return li && li.dataset.room")

    def members(self):
        return self.js("return [...document.querySelectorAll('#members li')].map(li => li.textContent)")

    def messages(self):
        return self.js(
            "return [...document.querySelectorAll('#messages .message .text')].map(e => e.textContent)"
        )

    def notices(self):
        return self.js("return [...document.querySelectorAll('#messages .notice')].map(e => e.textContent)")

    def typing(self):
        return self.js("return document.getElementById('typing').textContent")

    def epoch(self, room):
        """The epoch of ``room``'s offsets the page keeps (from its last history page)."""
        return self.js("return rooms.get(arguments[0]).epoch", room)

    def wait_members(self, expected):
        expected = sorted(expected)
        self.wait(lambda: sorted(self.members()) == expected, f"members {expected} (have {self.members()})")

    def wait_message(self, text):
        self.wait(lambda: text in self.messages(), f"message {text!r} (have {self.messages()})")

    def wait_messages(self, expected):
        """Wait until the room on screen shows exactly ``expected``, in that order."""
        self.wait(lambda: self.messages() == expected, f"messages {expected} (have {self.messages()})")

    def console_errors(self, failed_connections_ok=False):
        """Severe console entries; with ``failed_connections_ok``, not Chromium's note of
        each WebSocket attempt that failed while the server was away."""
        self.focus()
        errors = [e for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]
        if failed_connections_ok:
            errors = [e for e in errors if "WebSocket connection to" not in e.get("message", "")]
        return errors

    def quit(self):
        self.driver.quit()


def test_two_browsers_chat_with_live_presence(open_page):
    room = new_chat_room()
    alice, bob = open_page("alice"), open_page("bob")
    alice.login("alice")
    bob.login("bob")

    alice.join(room)
    assert alice.members() == ["alice"]
    bob.join(room)
    alice.wait_members(["alice", "bob"])
    bob.wait_members(["alice", "bob"])
    alice.wait(lambda: "bob joined" in alice.notices(), "join notice")

    alice.say("hello bob")
    bob.wait_message("hello bob")
    bob.say("hi alice, <b>not bold</b>")
    alice.wait_message("hi alice, <b>not bold</b>")  # text, never HTML
    assert alice.js("return document.querySelectorAll('#messages b').length") == 0
    assert alice.messages() == ["hello bob", "hi alice, <b>not bold</b>"]
    assert bob.messages() == alice.messages()

    # a small touch: "bob is typing…" while bob types
    bob.type_into("message-input", "still typ")
    alice.wait(lambda: alice.typing().startswith("bob is typing"), "typing indicator")

    # bob closes his browser: alice's member list follows
    bob_errors = bob.console_errors()
    bob.quit()
    alice.wait_members(["alice"])
    alice.wait(lambda: "bob left" in alice.notices(), "leave notice")
    assert alice.console_errors() == []
    assert bob_errors == []


def server_settled(connections):
    """Wait until this process's server has ``connections`` and has run every handler
    of the events it received (handle_close and handle_presence of a closed tab included)."""
    import warpsocket

    def settled():
        stats = warpsocket.stats()
        return stats["connections"] == connections and all(w["queue_depth"] == 0 for w in stats["workers"])

    wait_for(settled, timeout=WAIT, message=f"{connections} connections, every handler run")


def test_a_user_with_two_tabs_is_one_member(open_page):
    room = new_chat_room()
    bob = open_page("bob")
    bob.login("bob")
    bob.join(room)
    alice = open_page("alice")
    alice_2 = alice.open_tab()
    alice.login("alice")
    alice_2.login("alice")
    alice.join(room)
    bob.wait_members(["alice", "bob"])
    bob.wait(lambda: bob.notices() == ["alice joined"], "join notice")
    alice_2.join(room)
    alice_2.wait_members(["alice", "bob"])  # presence: alice once, however many tabs
    alice.wait_members(["alice", "bob"])
    # One process delivers a note of alice_2's join before her message: had there been one.
    alice_2.say("two tabs")
    bob.wait_message("two tabs")
    assert bob.notices() == ["alice joined"]
    assert bob.members() == ["alice", "bob"]

    # alice closes one tab: nothing changes for bob
    alice.close_tab()
    server_settled(connections=2)
    alice_2.say("one tab left")
    bob.wait_message("one tab left")
    assert bob.notices() == ["alice joined"]
    assert bob.members() == ["alice", "bob"]

    # and the other: now she leaves
    alice_2.close_tab()
    bob.wait_members(["bob"])
    bob.wait(lambda: bob.notices() == ["alice joined", "alice left"], f"leave notice (have {bob.notices()})")
    server_settled(connections=1)
    assert bob.notices() == ["alice joined", "alice left"]
    assert bob.console_errors() == []


def test_late_joiner_sees_history_and_leaving_updates_presence(open_page):
    room, other = new_chat_room(), new_chat_room()
    alice, bob = open_page("alice"), open_page("bob")
    alice.login("alice")
    alice.join(room)
    sent = [f"message {i} before bob" for i in range(3)]
    for text in sent:
        alice.say(text)

    # bob arrives later: the room's history is there
    bob.login("bob")
    bob.join(room)
    bob.wait(lambda: bob.messages() == sent, f"history {sent} (have {bob.messages()})")
    alice.wait_members(["alice", "bob"])

    # one page in two rooms at once, messages routed to the right one
    bob.join(other)
    alice.join(other)
    alice.say("in the other room")
    bob.wait_message("in the other room")
    bob.js("document.querySelector(`#rooms li[data-room='${arguments[0]}']`).click()", room)
    bob.wait(lambda: bob.active_room() == room, "switched back")
    assert "in the other room" not in bob.messages()
    assert bob.messages() == sent

    # bob leaves the first room with its × button
    bob.js("document.querySelector(`#rooms li[data-room='${arguments[0]}'] .leave`).click()", room)
    bob.wait(lambda: room not in bob.rooms(), "room gone from bob's list")
    alice.js("document.querySelector(`#rooms li[data-room='${arguments[0]}']`).click()", room)
    alice.wait(lambda: alice.active_room() == room, "alice back in the first room")
    alice.wait_members(["alice"])
    alice.say("said while bob was away")

    # and rejoins: everything said meanwhile is in the history
    bob.join(room)
    bob.wait(
        lambda: bob.messages() == [*sent, "said while bob was away"],
        f"history after rejoining (have {bob.messages()})",
    )
    alice.wait_members(["alice", "bob"])
    assert alice.console_errors() == []
    assert bob.console_errors() == []


def say_until(sender, room, stop, *, texts, at_least, at_most):
    """``sender`` (a websockets :class:`Chat`) says ``texts`` one by one in ``room``, each
    once it got the previous back, until ``stop()`` holds (checked between messages)
    and it said ``at_least``; never more than ``at_most``. Returns what it said."""
    said = []
    for text in texts:
        if len(said) >= at_most or (len(said) >= at_least and stop()):
            break
        sender.send(type="say", room=room, text=text)
        sender.expect("message", room, text=text)
        said.append(text)
    return said


def test_the_page_reconnects_to_a_restarted_server(chat_server, start_server, open_page):
    room = new_chat_room()
    alice = open_page("alice")
    alice.login("alice")
    alice.join(room)
    alice.say("said before the restart")
    epoch = alice.epoch(room)
    port = chat_server.port

    chat_server.stop(timeout=10)
    alice.wait(lambda: not alice.online(), "the drop noticed")
    restarted = start_server(
        worker=str(CHAT_WORKER),
        static_dir=str(CHAT_STATIC),
        threads=2,
        history=CHAT_HISTORY,
        bind=f"127.0.0.1:{port}",
    )
    bob = Chat(restarted)
    try:
        bob.hello("bob")
        bob.join(room)
        # bob talks while the page reconnects (new epoch: recover() says False, the page
        # gets the new server's history page) and on after it: every message once, in order.
        said = say_until(
            bob, room, alice.online, texts=(f"new {i}" for i in range(40)), at_least=3, at_most=30
        )
        said += say_until(bob, room, lambda: True, texts=("after 0", "after 1"), at_least=2, at_most=2)
        alice.wait_messages(said)  # the first server's messages went with it
        assert alice.epoch(room) not in (None, epoch)
        alice.say("alice is back")
        bob.expect("message", room, text="alice is back")
        alice.wait_messages([*said, "alice is back"])
        alice.wait_members(["alice", "bob"])
    finally:
        bob.close()
    assert alice.console_errors(failed_connections_ok=True) == []


# --------------------------------------------------------------------------
# a cluster: the page moves to another node when its node dies
# --------------------------------------------------------------------------


@pytest.fixture
def redis(browser_tools, redis):
    """conftest's redis-server, started once the browser tools are known to be there."""
    return redis


@pytest.fixture
def chat_nodes(redis):
    """``chat_nodes(n) -> [(ServerProcess, port), ...]``: chat nodes on ``redis`` that
    accept each other's pages (Origin); all stopped at teardown."""
    nodes = []

    def _start(count):
        ports = [free_port() for _ in range(count)]
        origins = {"allowed_origins": [f"http://127.0.0.1:{port}" for port in ports]}
        started = []
        for port in ports:
            argv = warpsocket_command(
                CHAT_WORKER, "--bind", f"127.0.0.1:{port}", "--static", CHAT_STATIC,
                "--history", "room:=50/86400", "--cluster", redis.url, "--threads", "2",
                "--worker-arg", json.dumps(origins),
            )  # fmt: skip
            node = ServerProcess(argv, port=port)
            nodes.append(node)
            node.wait_listening()
            started.append((node, port))
        return started

    yield _start
    for node in nodes:
        node.stop()


def test_the_page_moves_to_another_node_when_its_node_is_killed(chat_nodes, open_page):
    room = new_chat_room()
    (a, port_a), (_, port_b) = chat_nodes(2)
    other = f"ws://127.0.0.1:{port_b}/chat"
    alice = open_page("alice", f"http://127.0.0.1:{port_a}/?ws={other}")
    bob = open_page("bob", f"http://127.0.0.1:{port_b}/")
    alice.login("alice")
    bob.login("bob")
    alice.join(room)
    bob.join(room)
    alice.wait_members(["alice", "bob"])
    before = [f"before {i}" for i in range(3)]
    for text in before:
        bob.say(text)
    alice.wait_messages(before)
    alice.wait(lambda: "bob joined" in alice.notices(), "join notice")
    assert alice.js("return ws.url").startswith(f"ws://127.0.0.1:{port_a}/")
    epoch = alice.epoch(room)

    a.kill()  # SIGKILL: no close frame, no goodbye
    # bob talks on while alice's page finds out, tries node A again, and moves to B,
    # where recover() replays what it missed from the history kept in Redis.
    away = [f"while away {i}" for i in range(5)]
    for text in away:
        bob.say(text)
    alice.wait(lambda: alice.online() and alice.js("return ws.url").startswith(other), "reconnected to B")
    bob.say("after")
    alice.wait_messages([*before, *away, "after"])
    # Recovered, not reloaded: a history page would have replaced the room's notices too.
    assert "bob joined" in alice.notices()
    assert alice.epoch(room) == epoch
    alice.say("alice on B")
    bob.wait_messages([*before, *away, "after", "alice on B"])
    assert alice.console_errors(failed_connections_ok=True) == []
    assert bob.console_errors() == []


def test_a_killed_nodes_users_leave_the_other_nodes_member_list(chat_nodes, open_page):
    room = new_chat_room()
    (a, port_a), (_, port_b) = chat_nodes(2)
    # alice has a tab on each node, carol one on node A; neither page may move to B
    alice_b = open_page("alice", f"http://127.0.0.1:{port_b}/")
    alice_a = alice_b.open_tab(f"http://127.0.0.1:{port_a}/")
    carol = open_page("carol", f"http://127.0.0.1:{port_a}/")
    for page, name in ((alice_b, "alice"), (alice_a, "alice"), (carol, "carol")):
        page.login(name)
        page.join(room)
    alice_b.wait_members(["alice", "carol"])
    alice_b.wait(lambda: alice_b.notices() == ["carol joined"], f"join notice (have {alice_b.notices()})")

    a.kill()  # SIGKILL: node A says no goodbye; node B learns of it from Redis
    # The promise is 15 s from the kill (12 s as built); the wait allows for a loaded box.
    alice_b.wait(lambda: alice_b.members() == ["alice"], f"carol gone (have {alice_b.members()})", timeout=20)
    alice_b.wait(lambda: "carol left" in alice_b.notices(), f"leave notice (have {alice_b.notices()})")
    # alice stays: her tab on node B still holds her place
    alice_b.say("still here")
    assert alice_b.notices() == ["carol joined", "carol left"]
    assert alice_b.members() == ["alice"]
    assert alice_b.console_errors(failed_connections_ok=True) == []  # her tab on A retries
