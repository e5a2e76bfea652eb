"""Hung-worker detection: retire a worker that stopped picking up its events.

The core knows how long each worker's oldest waiting event has waited. The
supervisor looks every fraction of ``hang_timeout``; an idle queue gets a probe
event, so a worker stuck in a handler is noticed even when its connections are
quiet. A worker that took up an event since the last look is making progress
(one batch of many slow handlers can outlast ``hang_timeout``): its stall counts
from that look. No handler code runs here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .worker import Worker


class Supervisor(threading.Thread):
    """Watches the live workers and calls ``retire(worker)`` for hung ones."""

    def __init__(
        self,
        hang_timeout: float,
        live_workers: Callable[[], list[Worker]],
        retire: Callable[[Worker, float], None],
    ) -> None:
        super().__init__(name="warpsocket-supervisor", daemon=True)
        self._hang_timeout = hang_timeout
        self._live_workers = live_workers
        self._retire = retire
        self._stopped = threading.Event()

    def run(self) -> None:
        """Check every worker until stopped."""
        interval = min(max(self._hang_timeout / 4, 0.05), 0.5)
        # worker -> (its picked_up count, when the supervisor saw it change)
        progress: dict[Worker, tuple[int, float]] = {}
        while not self._stopped.wait(interval):
            now = time.monotonic()
            workers = self._live_workers()
            for worker in workers:
                count = worker.picked_up
                seen = progress.get(worker)
                if seen is None or seen[0] != count:
                    seen = progress[worker] = (count, now)
                stalled = min(worker.queue.stalled_for(), now - seen[1])
                if stalled > self._hang_timeout:
                    self._retire(worker, stalled)
                else:
                    worker.queue.probe()
            for gone in progress.keys() - set(workers):
                del progress[gone]

    def stop(self) -> None:
        """End the thread; a retirement in progress ends soon once ``Server.stop`` began."""
        self._stopped.set()
        if self.is_alive():
            self.join()
