#!/usr/bin/env bash
# Installs what the metrics tests need besides the Python packages: Debian's
# `prometheus` package, for `promtool check metrics` and a real Prometheus server
# that tests/prometheus_helper.py starts on a free port (its systemd service is
# not used). Meant to be run by .ci/run before the test suite.
set -euo pipefail

if ! [ -x /usr/bin/prometheus ] || ! [ -x /usr/bin/promtool ]; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends prometheus
fi
