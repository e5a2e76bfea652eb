"""A real Prometheus server (Debian's ``prometheus`` package) for the metrics tests.

``running_prometheus(workdir, targets)`` starts one on a free port with a generated
config that scrapes ``targets`` every second, and stops it afterwards;
``promtool_check_metrics(page)`` lints an exposition page. Without the binaries a
test is skipped loudly, or fails when ``CI`` is set (.ci/run installs them with
``scripts/test.sh``, run as root).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL_HINT = "scripts/test.sh run as root installs Debian's prometheus package"


def require_binary(name: str) -> str:
    """Path of ``name`` (``prometheus`` or ``promtool``); skip loudly, or fail under CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} IS NOT INSTALLED: the metrics checks that need it did not run ({INSTALL_HINT})"
        if os.environ.get("CI"):
            pytest.fail(message)
        warnings.warn(message, stacklevel=2)
        pytest.skip(message)
    return path


def promtool_check_metrics(page: bytes) -> subprocess.CompletedProcess[str]:
    """Run ``promtool check metrics`` on an exposition page; returns the finished process."""
    return subprocess.run(
        [require_binary("promtool"), "check", "metrics"],
        input=page.decode(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A running Prometheus server; use ``running_prometheus`` to get one."""

    def __init__(self, binary: str, workdir: Path, targets: list[str]) -> None:
        self.workdir = workdir
        self.config = workdir / "prometheus.yml"
        # JSON is YAML: no YAML library needed to write the config.
        self.config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [{"job_name": "warpsocket", "static_configs": [{"targets": targets}]}],
                }
            )
        )
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # The port is picked free and then handed to Prometheus, which cannot report
        # a port 0 back; another process may take it in between, hence the retries.
        for _ in range(3):
            self.port = _free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            if self._start(binary):
                return
        raise AssertionError(f"prometheus did not start; its log:\n{self.log_tail()}")

    def _start(self, binary: str) -> bool:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=info",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                return False
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as response:
                    if response.status == 200:
                        return True
            time.sleep(0.1)
        self.stop()
        return False

    def api(self, path: str, **params: str) -> dict:
        """GET ``/api/v1/<path>`` and return its ``data`` (asserts ``status == success``)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query; returns the result vector (``[{metric, value}, ...]``)."""
        return self.api("query", query=expr)["result"]

    def wait_for_series(self, expr: str, timeout: float = 90.0) -> list[dict]:
        """Poll ``query(expr)`` until it returns a non-empty vector and return it."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                targets = self.api("targets")["activeTargets"]
                health = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]
                raise AssertionError(
                    f"no series for {expr!r} after {timeout}s; targets: {health}\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of Prometheus' own log, for failure messages."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server and wait for it to exit."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@contextlib.contextmanager
def running_prometheus(workdir: Path, targets: list[str]) -> Iterator[Prometheus]:
    """A Prometheus server scraping ``targets`` ("host:port") every second, stopped on exit."""
    binary = require_binary("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    server = Prometheus(binary, workdir, targets)
    try:
        yield server
    finally:
        server.stop()
