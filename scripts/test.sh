#!/usr/bin/env bash
# Installs WarpSocket with its test tools into .venv, then runs every check and
# test: rustfmt, clippy, the engine's unit tests, ruff, mypy (--strict on the
# package, and stubtest: python/warpsocket/_core.pyi against the built extension),
# and the pytest suite. Extra arguments go to pytest.
#
# Some tests need system tools: tests/test_chat_browser.py (Chromium and its driver),
# tests/test_cluster.py (redis-server) and the metrics tests that use a real Prometheus
# (tests/prometheus_helper.py: prometheus, promtool). Run as root with apt-get at hand,
# this installs the missing ones (Debian packages; nothing is downloaded at test
# time); otherwise those tests skip, and the last lines of the output name them.
set -euo pipefail
cd "$(dirname "$0")/.."

CHROMIUM=${WARPSOCKET_CHROMIUM:-/usr/bin/chromium}
CHROMEDRIVER=${WARPSOCKET_CHROMEDRIVER:-/usr/bin/chromedriver}

missing_packages() {
    [ -x "$CHROMIUM" ] || echo chromium
    [ -x "$CHROMEDRIVER" ] || echo chromium-driver
    command -v redis-server >/dev/null || echo redis-server
    command -v redis-cli >/dev/null || echo redis-tools
    { command -v prometheus && command -v promtool; } >/dev/null || echo prometheus
}

packages=$(missing_packages)
if [ -n "$packages" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q
    # shellcheck disable=SC2086 # one word per package
    apt-get install -y -q --no-install-recommends $packages
fi

# Printed last, also when a check fails: the tests this run could not run.
report_not_run() {
    local packages
    packages=$(missing_packages)
    [ -n "$packages" ] || return 0
    {
        echo
        echo "################################################################################"
        echo "# NOT RUN: these tests need system packages that are missing (they skip, or fail under CI):"
        if [[ $packages == *chromium* ]]; then
            echo "#   tests/test_chat_browser.py and the browser test of tests/test_tls.py: Chromium and its driver"
            echo "#     ($CHROMIUM, $CHROMEDRIVER)"
        fi
        if [[ $packages == *redis* ]]; then
            echo "#   tests/test_cluster.py: redis-server and redis-cli"
        fi
        if [[ $packages == *prometheus* ]]; then
            echo "#   the metrics tests using tests/prometheus_helper.py: prometheus and promtool"
        fi
        echo "# Install them (run this script as root to do it: apt-get install" $packages")"
        echo "################################################################################"
    } >&2
}
trap report_not_run EXIT

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q ".[test,tls-test,examples]" ruff mypy

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test -p warpsocket-core -p warpsocket-py
.venv/bin/python scripts/check_layers.py
.venv/bin/ruff check python tests examples benchmarks scripts
.venv/bin/mypy --strict python/warpsocket
.venv/bin/python -m mypy.stubtest warpsocket._core
.venv/bin/python -m pytest "$@"
