"""Syscalls and context switches of a server over the measurement window, from ``perf stat``.

``perf stat`` attaches to the server (every syscall-entry tracepoint plus the
``context-switches`` software event) as soon as it listens, with its counters disabled
(``--delay -1``); the runner enables them at ``WINDOW_START`` and disables them at
``WINDOW_END`` through perf's control FIFO, so the counts cover exactly the window, as the
CPU figures do. Attaching to ~350 tracepoints per thread takes a while, which is why it
is not started at the window itself.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

#: Columns of the per-request table: a label and the syscalls it sums.
COLUMNS: list[tuple[str, tuple[str, ...]]] = [
    ("recvfrom", ("recvfrom",)),
    ("recvmsg", ("recvmsg",)),
    ("read", ("read",)),
    ("sendto", ("sendto",)),
    ("sendmsg", ("sendmsg",)),
    ("writev", ("writev",)),
    ("write", ("write",)),
    ("epoll_wait", ("epoll_wait", "epoll_pwait", "epoll_pwait2")),
    ("futex", ("futex",)),
]
PREFIX = "syscalls:sys_enter_"
CONTEXT_SWITCHES = "context-switches"


def available() -> str | None:
    """None when ``perf stat`` can count syscall tracepoints here, else why not."""
    if shutil.which("perf") is None:
        return "perf is not installed"
    probe = subprocess.run(
        ["perf", "stat", "-x,", "-e", f"{PREFIX}recvfrom", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return (probe.stderr.strip().splitlines() or ["perf stat failed"])[-1][:200]
    return None


class PerfStat:
    """``perf stat`` attached to one process, counting only between enable() and disable()."""

    def __init__(self, pid: int, folder: Path, name: str) -> None:
        self.out = folder / f"{name}.perf.csv"
        self.ctl = folder / f"{name}.perf-ctl"
        for path in (self.out, self.ctl):
            path.unlink(missing_ok=True)
        os.mkfifo(self.ctl)
        self.log = open(folder / f"{name}.perf.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            ["perf", "stat", "-x,", "-o", str(self.out), "-p", str(pid), "--delay", "-1",
             "--control", f"fifo:{self.ctl}", "-e", f"{PREFIX}*", "-e", CONTEXT_SWITCHES],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.fd = self._open_control(timeout=60.0)

    def _open_control(self, timeout: float) -> int:
        """Open the control FIFO for writing once perf has opened it for reading."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return os.open(self.ctl, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO or self.proc.poll() is not None:
                    raise RuntimeError(f"perf stat did not start: {exc}") from exc
                if time.monotonic() > deadline:
                    raise RuntimeError("perf stat did not open its control FIFO") from exc
                time.sleep(0.05)

    def enable(self) -> None:
        """Start counting (at WINDOW_START)."""
        os.write(self.fd, b"enable\n")

    def disable(self) -> None:
        """Stop counting (at WINDOW_END)."""
        os.write(self.fd, b"disable\n")

    def close(self) -> dict[str, float]:
        """Stop perf; the counts by event (syscalls by name, and ``context-switches``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)
        self.ctl.unlink(missing_ok=True)
        self.log.close()
        return parse(self.out.read_text()) if self.out.exists() else {}


def parse(csv: str) -> dict[str, float]:
    """Counts from ``perf stat -x,`` output: ``{"recvfrom": n, ..., "context-switches": n}``."""
    counts: dict[str, float] = {}
    for line in csv.splitlines():
        fields = line.split(",")
        if len(fields) < 3 or line.startswith("#"):
            continue
        value, event = fields[0], fields[2]
        try:
            count = float(value)
        except ValueError:  # "<not counted>", "<not supported>"
            continue
        counts[event.removeprefix(PREFIX)] = count
    return counts


def per_request(counts: dict[str, float], requests: int) -> dict[str, float]:
    """The table's columns per request, plus ``other`` syscalls, ``all`` and ``ctx-switches``."""
    if not requests or not counts:
        return {}
    syscalls = {k: v for k, v in counts.items() if k != CONTEXT_SWITCHES}
    row = {label: sum(syscalls.get(n, 0.0) for n in names) / requests for label, names in COLUMNS}
    total = sum(syscalls.values()) / requests
    row["other"] = max(0.0, total - sum(row.values()))  # not -0.00 from rounding
    row["all syscalls"] = total
    row["ctx switches"] = counts.get(CONTEXT_SWITCHES, 0.0) / requests
    return row
