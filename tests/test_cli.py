"""The command line: ``python -m warpsocket`` and the ``warpsocket`` script."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    ECHO_WORKER,
    ServerProcess,
    ask,
    connect,
    expect_close,
    free_port,
    read_lines,
    tcp_connectable,
    wait_for,
    warpsocket_command,
)

ALL_OPTIONS = [
    "--bind",
    "--threads",
    "--worker-arg",
    "--handler-timeout",
    "--hang-timeout",
    "--max-message-size",
    "--max-backpressure",
    "--ping-interval",
    "--ping-timeout",
    "--history",
]

CLI_WORKER = """
import json, threading
import warpsocket

ARG = None

def handle_start(worker_arg):
    global ARG
    ARG = worker_arg
    with open(worker_arg["log"], "a") as f:
        f.write(json.dumps({"tid": threading.get_ident(), "greeting": worker_arg["greeting"]}) + "\\n")

def handle_text_message(text, socket_id):
    warpsocket.send(socket_id, ARG["greeting"] + ":" + text)

def handle_binary_message(data, socket_id):
    warpsocket.send(socket_id, data)
"""


def cli_commands():
    commands = [pytest.param([sys.executable, "-m", "warpsocket"], id="python-m")]
    script = shutil.which(
        "warpsocket",
        path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    )
    commands.append(
        pytest.param(
            [script] if script else None,
            id="script",
            marks=pytest.mark.skipif(script is None, reason="warpsocket console script not installed"),
        )
    )
    return commands


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", cli_commands())
def test_cli_help_lists_every_option(command, tmp_path):
    result = subprocess.run(
        [*command, "--help"],
        capture_output=True,
        text=True,
        timeout=45,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    for option in ALL_OPTIONS:
        assert option in text, f"--help does not mention {option}:\n{text}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", cli_commands())
def test_cli_runs_echo_and_stops_on_signal(command, sig, tmp_path):
    worker = tmp_path / "cli_worker.py"
    worker.write_text(CLI_WORKER)
    start_log = tmp_path / "starts.log"
    port1, port2 = free_port(), free_port()
    while port2 == port1:
        port2 = free_port()
    worker_arg = json.dumps({"log": str(start_log), "greeting": "hey"})
    argv = [
        *command,
        str(worker),
        "--bind",
        f"127.0.0.1:{port1}",
        "--bind",
        f"127.0.0.1:{port2}",
        "--threads",
        "3",
        "--worker-arg",
        worker_arg,
        "--handler-timeout",
        "4.5",
        "--max-message-size",
        "1048576",
    ]
    cli = ServerProcess(argv, cwd=tmp_path)
    try:
        cli.wait_listening(port1)
        cli.wait_listening(port2)
        with connect(f"ws://127.0.0.1:{port1}/") as ws:
            assert ask(ws, "one") == "hey:one"
            assert ask(ws, b"\x01bin") == b"\x01bin"
        held = connect(f"ws://127.0.0.1:{port2}/")
        try:
            assert ask(held, "two") == "hey:two"
            # --threads 3 and --worker-arg: handle_start ran in three workers with the parsed JSON
            starts = [json.loads(line) for line in read_lines(start_log)]
            assert len(starts) == 3
            assert {s["greeting"] for s in starts} == {"hey"}
            assert len({s["tid"] for s in starts}) == 3
            wait_for(
                lambda: "listening on" in cli.output(),
                timeout=10,
                message="'listening on' log line",
            )
            cli.proc.send_signal(sig)
            # graceful shutdown: open connections are closed with 1001
            code, _ = expect_close(held, timeout=30)
            assert code == 1001
        finally:
            held.close()
        rc = cli.wait(60)
        assert rc == 0, cli.output()
    finally:
        cli.kill()
    output = "".join(cli.stderr)
    assert "listening on" in output
    assert f"127.0.0.1:{port1}" in output
    assert f"127.0.0.1:{port2}" in output
    assert not tcp_connectable("127.0.0.1", port1, timeout=1)


@pytest.mark.timeout(60)
def test_cli_default_options_and_module_worker(tmp_path):
    (tmp_path / "cli_mod_worker.py").write_text(ECHO_WORKER)
    port = free_port()
    cli = ServerProcess(
        warpsocket_command("cli_mod_worker", "--bind", f"127.0.0.1:{port}"),
        cwd=tmp_path,
    )
    # the module is importable because `python -m` puts the working directory (tmp_path) on sys.path
    try:
        cli.wait_listening(port)
        with connect(f"ws://127.0.0.1:{port}/") as ws:
            assert ask(ws, "echo") == "echo"
        cli.proc.send_signal(signal.SIGINT)
        assert cli.wait(45) == 0, cli.output()
    finally:
        cli.kill()


@pytest.mark.timeout(60)
def test_cli_bad_worker_exits_nonzero(tmp_path):
    port = free_port()
    cli = ServerProcess(
        warpsocket_command(str(Path(tmp_path) / "missing_worker.py"), "--bind", f"127.0.0.1:{port}"),
        cwd=tmp_path,
    )
    try:
        rc = cli.wait(45)
    finally:
        cli.kill()
    assert rc != 0
    assert "missing_worker" in cli.output()


@pytest.mark.timeout(60)
def test_cli_exits_promptly_after_sigint_with_no_clients(tmp_path):
    worker = tmp_path / "w.py"
    worker.write_text(ECHO_WORKER)
    port = free_port()
    cli = ServerProcess(
        warpsocket_command(str(worker), "--bind", f"127.0.0.1:{port}", "--threads", "2"),
        cwd=tmp_path,
    )
    try:
        cli.wait_listening(port)
        t0 = time.monotonic()
        cli.proc.send_signal(signal.SIGINT)
        assert cli.wait(45) == 0, cli.output()
        assert time.monotonic() - t0 < 30
    finally:
        cli.kill()
