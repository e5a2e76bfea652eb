#!/usr/bin/env bash
# Runs the concurrency-heavy tests N times in a row and counts passes and failures: a
# race that shows once in twenty runs needs this, one run proves little.
#
#   scripts/repeat-concurrency.sh [N] [PYTEST ARGS...]          # N defaults to 20
#   PYTHON=.venv/bin/python scripts/repeat-concurrency.sh 5     # on the GIL build
#
# PYTHON defaults to .venv-ft/bin/python, the free-threaded 3.13t venv that
# scripts/test-freethreaded.sh creates (run that once first); WarpSocket must already be
# installed into it. The tests are the ones where many threads call subscribe / send /
# kv / virtual sockets while connections open and close: test_concurrency, test_kv,
# test_channels and test_virtual_sockets. Each run's output goes to
# target/repeat-concurrency/run-K.log; the failing tests are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

N=20
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then
    N=$1
    shift
fi
PYTHON=${PYTHON:-.venv-ft/bin/python}
TESTS=(tests/test_concurrency.py tests/test_kv.py tests/test_channels.py tests/test_virtual_sockets.py)
LOGS=target/repeat-concurrency
mkdir -p "$LOGS"
rm -f "$LOGS"/run-*.log

"$PYTHON" - <<'EOF'
import sys, sysconfig
import warpsocket  # noqa: F401  (installed?)
ft = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
gil = sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True
print(f"[repeat] {sys.version.split()[0]}{' free-threaded' if ft else ''}, GIL {'enabled' if gil else 'disabled'}")
EOF

passed=0
failed=0
start=$(date +%s)
for run in $(seq 1 "$N"); do
    log=$LOGS/run-$run.log
    t0=$(date +%s)
    if "$PYTHON" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "$@" >"$log" 2>&1; then
        passed=$((passed + 1))
        result=passed
    else
        failed=$((failed + 1))
        result="FAILED (log: $log)"
    fi
    echo "[repeat] run $run/$N: $(tail -1 "$log" | tr -d '=') in $(($(date +%s) - t0)) s: $result"
done
echo "[repeat] $passed passed, $failed failed, of $N runs in $(($(date +%s) - start)) s ($(uptime | sed 's/.*load average/load average/'))"
if [ "$failed" -gt 0 ]; then
    echo "[repeat] failing tests:"
    grep -h '^FAILED\|^ERROR' "$LOGS"/run-*.log | sort | uniq -c | sort -rn
    exit 1
fi
