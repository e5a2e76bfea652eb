"""The engine's log records, handed to :mod:`logging` by a thread of their own.

The native engine never takes the GIL to log: its threads queue each record (a bounded
queue: when it is full, records are dropped and the count is logged later) and signal a
descriptor. While a server runs, the ``warpsocket-log`` thread waits on that descriptor
and logs the records on the logger they name (``warpsocket`` for the engine's own),
where the usual levels and handlers apply. So a worker that holds the GIL never delays
an I/O thread, only the log output.
"""

from __future__ import annotations

import logging
import os
import select
import threading

from . import _core

logger = logging.getLogger("warpsocket")


def flush() -> None:
    """Log every record the engine has queued, in this thread."""
    records, dropped = _core.take_log_records()
    for name, level, message, path, line in records:
        target = logging.getLogger(name)
        if target.isEnabledFor(level):
            target.handle(target.makeRecord(name, level, path or "(engine)", line, message, (), None))
    if dropped:
        logger.warning("%d log records of the engine were dropped: more came than could be logged", dropped)


class LogPump(threading.Thread):
    """Logs the engine's records as they come, until :meth:`stop`."""

    def __init__(self) -> None:
        super().__init__(name="warpsocket-log", daemon=True)
        self._fd = _core.log_fd()
        self._stop_read, self._stop_write = os.pipe()

    def run(self) -> None:
        """Wait for records (or the stop signal) and log them."""
        watched = [self._stop_read] if self._fd is None else [self._fd, self._stop_read]
        try:
            while True:
                ready, _, _ = select.select(watched, [], [])
                if self._stop_read in ready:
                    return
                try:
                    flush()
                except Exception:  # a broken handler must not end the engine's logging
                    logger.exception("logging a record of the engine failed")
        finally:
            os.close(self._stop_read)

    def stop(self) -> None:
        """End the thread, then log what is still queued."""
        os.write(self._stop_write, b"x")
        self.join()
        os.close(self._stop_write)
        flush()
