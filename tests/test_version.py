"""The version: one number, the workspace Cargo.toml's, reported by the package and the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import warpsocket

CARGO_TOML = Path(__file__).resolve().parent.parent / "Cargo.toml"


def cargo_version() -> str:
    """``version`` of ``[workspace.package]`` (tomllib is 3.11+, the suite runs on 3.10 too)."""
    section = CARGO_TOML.read_text().split("[workspace.package]", 1)[1].split("\n[", 1)[0]
    match = re.search(r'^version\s*=\s*"([^"]+)"', section, re.MULTILINE)
    assert match, f"no version in [workspace.package] of {CARGO_TOML}"
    return match.group(1)


def test_version_is_the_workspace_version():
    assert warpsocket.__version__ == cargo_version()
    assert warpsocket.__version__ == version("warpsocket")


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([sys.executable, "-m", "warpsocket"], id="python-m"),
        pytest.param([str(Path(sys.executable).with_name("warpsocket"))], id="script"),
    ],
)
def test_cli_version(argv):
    result = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"warpsocket {cargo_version()}\n"
