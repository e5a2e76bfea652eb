"""benchmarks/run.py: the frames-per-request check, the rotation of servers and the host record.

The end-to-end tests run the real runner at a tiny size (20 connections, 1 s window)
against a real WarpSocket server with the real load generator (``warpsocket-bench``,
built in debug when no build is found).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "run.py"


def load_runner() -> ModuleType:
    """benchmarks/run.py as a module (it puts benchmarks/ on sys.path for its harness)."""
    spec = importlib.util.spec_from_file_location("benchmark_runner", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


runner = load_runner()


@pytest.fixture(scope="module")
def bench_binary() -> Path:
    """A warpsocket-bench build: an existing one, else a debug build made here."""
    targets = [Path(os.environ["CARGO_TARGET_DIR"])] if os.environ.get("CARGO_TARGET_DIR") else []
    targets.append(ROOT / "target")
    for target in targets:
        for profile in ("release", "debug"):
            if (binary := target / profile / "warpsocket-bench").exists():
                return binary
    if shutil.which("cargo") is None:
        pytest.skip("no warpsocket-bench build and no cargo to make one")
    subprocess.run(["cargo", "build", "-q", "-p", "warpsocket-bench"], cwd=ROOT, check=True, timeout=900)
    return targets[0] / "debug" / "warpsocket-bench"


def free_port() -> int:
    """A port the kernel just handed out, as the start of the runner's port search."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_benchmark(bench: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], list]:
    """The runner at a tiny size; its exit, output and JSON results."""
    cpu = str(min(os.sched_getaffinity(0)))  # a CPU this process may use, for both sides
    results = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--connections", "20", "--warmup", "0.5", "--duration", "1",
         "--no-install", "--bench", str(bench), "--server-cpu", cpu, "--client-cpu", cpu,
         "--ports", "2", "--source-ips", "1", "--base-port", str(free_port()),
         "--log-dir", str(tmp_path), "--json", str(results), *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return done, json.loads(results.read_text()) if results.exists() else []


def test_expected_frames_per_request() -> None:
    """Full channels of 10 give 11 frames a request; a partial last channel gives fewer."""
    assert runner.expected_frames_per_request(10_000) == 11.0
    assert runner.expected_frames_per_request(9_996) == pytest.approx(1 + (999 * 100 + 36) / 9_996)
    assert runner.expected_frames_per_request(15) == pytest.approx(1 + (100 + 25) / 15)


def test_check_frames_marks_a_short_delivery() -> None:
    """10.8 frames per request where 11 are due (a broadcast in 55 lost) fails; 10.95 passes."""
    short = runner.Result(
        "s", 10_000, 1, figures={"acks": 1000, "frames_received": 10_800, "connections": 10_000}
    )
    runner.check_frames(short, None)
    assert short.frames_per_request == pytest.approx(10.8)
    assert "frames/request 10.80, expected 11.00" in short.note
    assert not short.ok
    close = runner.Result(
        "s", 10_000, 1, figures={"acks": 1000, "frames_received": 10_950, "connections": 10_000}
    )
    runner.check_frames(close, None)
    assert close.ok and close.note == ""


def test_check_frames_keeps_a_run_over_its_frames() -> None:
    """11.2 frames per request loses nothing (the window's counts drifted): marked, kept."""
    over = runner.Result(
        "s", 10_000, 1, figures={"acks": 1000, "frames_received": 11_200, "connections": 10_000}
    )
    runner.check_frames(over, None)
    assert "frames/request 11.20, expected 11.00" in over.note
    assert over.ok


def test_threads_default_leaves_the_flag_out() -> None:
    """``--threads default`` runs WarpSocket with the CLI's own default worker count."""
    default = runner.server_command("warpsocket", [9000], "0", runner.threads_arg("default"))
    assert "--threads" not in default
    two = runner.server_command("warpsocket", [9000], "0", runner.threads_arg("2"))
    assert two[two.index("--threads") + 1] == "2"


def test_a_run_short_of_its_frames_fails_the_runner(bench_binary: Path, tmp_path: Path) -> None:
    """Every broadcast arrives (11.00 a request), so expecting 12 fails: exit 1, and why."""
    done, results = run_benchmark(
        bench_binary, tmp_path, "--servers", "warpsocket", "--repeat", "1", "--expect-frames", "12"
    )
    assert done.returncode == 1, done.stderr
    assert "FAILED: warpsocket, 20 connections, closed, round 1: 11.00 frames per request" in done.stderr
    assert "did not deliver every broadcast" in done.stderr
    [run] = results
    assert run["frames_per_request"] == pytest.approx(11.0, rel=0.01)
    assert run["expected_frames"] == 12.0


def test_rounds_rotate_and_record_the_host(bench_binary: Path, tmp_path: Path) -> None:
    """Two servers, two rounds: a, b then b, a; every run has frames, load and the host."""
    done, results = run_benchmark(
        bench_binary, tmp_path, "--servers", "warpsocket,warpsocket-metrics", "--repeat", "2"
    )
    assert done.returncode == 0, done.stderr
    order = [(r["run"], r["server"]) for r in results]
    assert order == [
        (1, "warpsocket"), (1, "warpsocket-metrics"), (2, "warpsocket-metrics"), (2, "warpsocket"),
    ]  # fmt: skip
    for r in results:
        assert r["frames_per_request"] == pytest.approx(11.0, rel=0.01)
        assert r["load_before"] is not None and r["load_after"] is not None
        assert r["host"]["cpu"] and r["host"]["kernel"]
    assert "frames/request" in done.stdout and "generator-bound rounds" in done.stdout


def test_manycore_runner_end_to_end(bench_binary: Path, tmp_path: Path) -> None:
    """benchmarks/manycore.py at a tiny size (two generators on one CPU): it sums every
    generator's figures and measures the server's CPU over the first one's window."""
    cpu = str(min(os.sched_getaffinity(0)))
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "manycore.py"), "--connections", "40",
         "--ports", "2", "--base-port", str(free_port()), "--server-cpus", cpu, "--client-cpus", cpu,
         "--generators", "2", "--threads", "1", "--source-ips", "1", "--warmup", "0.5",
         "--duration", "1", "--bench", str(bench_binary), "--log", str(tmp_path / "server.log")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    total = json.loads(done.stdout.splitlines()[0])
    assert total["connections"] == 40 and total["generators"] == 2
    assert total["errors"] == 0
    assert total["acks_per_s"] > 0 and total["frames_per_s"] > total["acks_per_s"]
    assert total["server_cpu_s"] is not None and total["server_cpu_s"] > 0
    assert total["acks_per_server_cpu_s"] > 0
    assert total["server_peak_rss_mib"] > 0
