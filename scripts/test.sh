#!/usr/bin/env bash
# Installs WarpSocket with its test tools into .venv, then runs every check and
# test: rustfmt, clippy, the engine's unit tests, ruff, and the pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q ".[test]" ruff

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test -p warpsocket-core
.venv/bin/python scripts/check_layers.py
.venv/bin/ruff check python tests examples benchmarks scripts
.venv/bin/python -m pytest "$@"
