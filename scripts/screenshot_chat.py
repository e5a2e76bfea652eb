#!/usr/bin/env python3
"""Take docs/chat.png: the chat example with two users talking, in headless Chromium.

Starts the chat example (page and WebSocket on one port), drives two browser pages
with Selenium, and saves a screenshot of one of them. Uses the system's Chromium
and chromedriver (Debian: ``apt-get install chromium chromium-driver``) and the
``selenium`` package; nothing is downloaded.

    python3 scripts/screenshot_chat.py [--output docs/chat.png]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import warpsocket
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
WAIT = 60


def open_page(url: str, profile: Path, chromium: str, chromedriver: str) -> webdriver.Chrome:
    """A headless Chromium showing ``url``, with its own fresh profile."""
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--hide-scrollbars",
        "--window-size=1100,720",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.get(url)
    return driver


def until(driver: webdriver.Chrome, script: str, *args) -> None:
    """Wait until the JavaScript expression ``script`` is truthy."""
    WebDriverWait(driver, WAIT, poll_frequency=0.1).until(
        lambda d: d.execute_script(f"return {script}", *args), message=script
    )


def fill(driver: webdriver.Chrome, element_id: str, text: str, submit_id: str | None = None) -> None:
    """Type ``text`` into an input, then click ``submit_id`` if given."""
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(text)
    if submit_id:
        driver.find_element(By.ID, submit_id).click()


def login(driver: webdriver.Chrome, name: str) -> None:
    """Pick a name."""
    until(driver, "document.getElementById('status').className.includes('online')")
    fill(driver, "name-input", name, "name-button")
    until(driver, "document.getElementById('me').textContent === arguments[0]", name)


def join(driver: webdriver.Chrome, room: str) -> None:
    """Join a room and wait until it is on screen."""
    fill(driver, "room-input", room, "join-button")
    until(driver, "document.querySelector('#rooms li.active')?.dataset.room === arguments[0]", room)


def say(driver: webdriver.Chrome, text: str, *others: webdriver.Chrome) -> None:
    """Send a message and wait until every page shows it."""
    fill(driver, "message-input", text, "send-button")
    for page in (driver, *others):
        until(
            page,
            "[...document.querySelectorAll('#messages .text')].some(e => e.textContent === arguments[0])",
            text,
        )


def main() -> None:
    """Run the scene and save the screenshot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / "docs" / "chat.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()

    server = warpsocket.start(
        bind="127.0.0.1:0",
        worker=str(ROOT / "examples" / "chat" / "worker.py"),
        static_dir=str(ROOT / "examples" / "chat" / "static"),
        threads=2,
        history={"room:": warpsocket.History(50, 86400.0)},  # as README runs it
    )
    url = f"http://127.0.0.1:{server.port}/"
    drivers = []
    try:
        with tempfile.TemporaryDirectory() as profiles:
            alice = open_page(url, Path(profiles) / "alice", args.chromium, args.chromedriver)
            drivers.append(alice)
            bob = open_page(url, Path(profiles) / "bob", args.chromium, args.chromedriver)
            drivers.append(bob)
            login(alice, "Alice")
            login(bob, "Bob")
            for room in ("random", "lobby"):
                join(alice, room)
                join(bob, room)
            until(alice, "document.querySelectorAll('#members li').length === 2")
            say(alice, "Hi Bob! The page and the WebSocket come from the same port.", bob)
            say(bob, "Nice, no nginx in front. Are we on different worker threads?", alice)
            say(alice, "We are: rooms are history channels, members come from presence.", bob)
            say(bob, "And when I close my last tab, you will see me leave.", alice)
            # something in the other room: Alice sees an unread badge there
            bob.execute_script("document.querySelector(`#rooms li[data-room='random']`).click()")
            say(bob, "Anyone in here?")
            until(alice, "document.querySelector(`#rooms li[data-room='random'] .unread`) !== null")
            bob.execute_script("document.querySelector(`#rooms li[data-room='lobby']`).click()")
            fill(bob, "message-input", "Let me try th")
            until(alice, "document.getElementById('typing').textContent.includes('Bob')")
            time.sleep(0.3)  # let the page settle (scrolling, fonts)
            output = Path(args.output)
            output.parent.mkdir(parents=True, exist_ok=True)
            alice.save_screenshot(str(output))
            print(f"saved {output}")
            for driver in drivers:
                driver.quit()
            drivers.clear()
    finally:
        for driver in drivers:
            driver.quit()
        server.stop(timeout=10)


if __name__ == "__main__":
    main()
