"""Waits with bounds: stop() with hung workers, and a replacement stuck in handle_start.

Neither may hold up stop() or the supervisor past its timeout (docs/api.md#limits).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from helpers import LOGGING_PRELUDE, ask, connect, read_lines, wait_for

HANG_WORKER = (
    LOGGING_PRELUDE
    + """
import time

def handle_start(worker_arg):
    global LOG
    LOG = worker_arg
    log("start", threading.get_ident())
    starts = sum(1 for line in open(LOG) if line.startswith("start "))
    if starts > STUCK_AFTER:
        # A replacement: its handle_start never returns on its own.
        log("stuck", threading.get_ident())
        wait_for_release()

def wait_for_release():
    while not os.path.exists(LOG + ".release"):
        time.sleep(0.01)

def handle_text_message(text, socket_id):
    if text == "who":
        warpsocket.send(socket_id, str(threading.get_ident()))
    elif text == "hang":
        log("hanging", threading.get_ident())
        wait_for_release()
    else:
        warpsocket.send(socket_id, text)
"""
)


@pytest.fixture
def release(log_path):
    """Creating the release file ends every hang of the worker above."""
    path = Path(str(log_path) + ".release")
    try:
        yield path
    finally:
        path.touch()


def hang_worker(threads):
    return HANG_WORKER.replace("STUCK_AFTER", str(threads))


def lines_starting(log_path, word):
    return [line for line in read_lines(log_path) if line.startswith(word + " ")]


@pytest.mark.timeout(120)
def test_stop_with_every_worker_hung_returns_within_about_its_timeout(start_server, log_path, release):
    threads = 4
    server = start_server(hang_worker(threads), threads=threads, worker_arg=str(log_path), hang_timeout=60)
    # One client on each worker thread.
    pinned = {}
    extra = []
    for _ in range(64):
        ws = connect(server)
        tid = ask(ws, "who")
        if tid in pinned:
            extra.append(ws)
        else:
            pinned[tid] = ws
        if len(pinned) == threads:
            break
    assert len(pinned) == threads, "could not reach every worker"
    for ws in pinned.values():
        ws.send("hang")
    wait_for(lambda: len(lines_starting(log_path, "hanging")) == threads, message="every worker hung")
    timeout = 1.0
    t0 = time.monotonic()
    server.stop(timeout=timeout)
    took = time.monotonic() - t0
    # One second of grace for all the threads together, not one each (that took 1 + 4 s).
    assert took < timeout + 2.0, f"stop({timeout}) took {took:.2f} s with {threads} hung workers"
    release.touch()
    for ws in [*pinned.values(), *extra]:
        ws.close()


@pytest.mark.timeout(120)
def test_replacement_stuck_in_handle_start_is_given_up_and_supervision_goes_on(
    start_server, log_path, release, caplog
):
    caplog.set_level(logging.WARNING, logger="warpsocket")
    hang_timeout = 0.5
    server = start_server(hang_worker(2), threads=2, worker_arg=str(log_path), hang_timeout=hang_timeout)

    def errors(text):
        return [r for r in caplog.records if r.levelno == logging.ERROR and text in r.getMessage()]

    first = connect(server)
    first.send("hang")
    wait_for(lambda: errors("retired"), message="the hung worker retired")
    wait_for(lambda: lines_starting(log_path, "stuck"), message="the replacement stuck in handle_start")
    wait_for(lambda: errors("did not finish handle_start"), timeout=10, message="the replacement given up")

    # The remaining worker serves, and the supervisor still notices when it hangs too.
    with connect(server) as second:
        assert ask(second, "still here") == "still here"
        second.send("hang")
        wait_for(lambda: len(errors("retired")) == 2, timeout=10, message="the second hung worker retired")
        given_up = "did not finish handle_start"
        wait_for(lambda: len(errors(given_up)) == 2, timeout=10, message="the second replacement given up")
    t0 = time.monotonic()
    server.stop(timeout=1.0)
    assert time.monotonic() - t0 < 3.0
    first.close()
