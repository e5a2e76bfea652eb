#!/usr/bin/env bash
# Runs the Autobahn WebSocket conformance cases (fuzzing client: kosoku) against the
# echo example served by WarpSocket, prints a per-group summary and exits non-zero
# when any case FAILED. Two runs, each against its own server: the protocol groups
# with the default options, then the permessage-deflate groups (12, 13) with
# --compression. kosoku runs through scripts/kosoku_run.py, which fixes one bug of
# its compression cases (uncompressed echoes). See docs/conformance.md.
#
#   scripts/autobahn.sh [OUTDIR]          (default OUTDIR: target/autobahn; the runs'
#                                         reports go to OUTDIR/default and OUTDIR/compression)
#
# Environment:
#   PYTHON            interpreter with warpsocket installed (default python3); kosoku is
#                     pip-installed into it
#   AUTOBAHN_CASES    space-separated case globs of the first run (default: groups 1-7, 9
#                     and 10); empty skips it
#   AUTOBAHN_DEFLATE_CASES  case globs of the --compression run (default: "12.* 13.*",
#                     groups 12 and 13); empty skips it
#   AUTOBAHN_TIMEOUT  seconds each kosoku run may take (default 900)
#   AUTOBAHN_SERVER_ARGS  extra `warpsocket` flags for both runs, e.g. "--max-backpressure 33554432"
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUTDIR=${1:-target/autobahn}
CASES=${AUTOBAHN_CASES-"1.* 2.* 3.* 4.* 5.* 6.* 7.* 9.* 10.*"}
DEFLATE_CASES=${AUTOBAHN_DEFLATE_CASES-"12.* 13.*"}
RUN_TIMEOUT=${AUTOBAHN_TIMEOUT:-900}
# shellcheck disable=SC2206
SERVER_ARGS=(${AUTOBAHN_SERVER_ARGS:-})
KOSOKU_VERSION=0.1.0

"$PYTHON" -m pip install -q "kosoku==$KOSOKU_VERSION"

rm -rf "$OUTDIR"
mkdir -p "$OUTDIR"
SERVER_PID=

stop_server() {
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -INT "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "autobahn: server did not stop on SIGINT within 10 s; killing it" >&2
            kill -KILL "$SERVER_PID" 2>/dev/null || true
        fi
    fi
    wait "$SERVER_PID" 2>/dev/null || true
}

# run_suite NAME "CASES" [FLAG...]: one server with the flags, one kosoku run; its
# report in OUTDIR/NAME. Returns non-zero when a case FAILED or the run broke.
run_suite() {
    local name=$1 cases=$2
    shift 2
    # No keepalive ping during a case: the cases count an unsolicited ping as an
    # event they did not expect (12.x/13.x close at once on it), and a 12.x case
    # can run past the default 20 s interval on a loaded machine.
    local -a FLAGS=("$@" --ping-interval 3600 "${SERVER_ARGS[@]}")
    REPORT="$OUTDIR/$name"
    CASES=$cases
    mkdir -p "$REPORT"
    SERVER_LOG="$REPORT/server.log"
    # The echo server binds an ephemeral loopback port and logs the address it got.
    "$PYTHON" -m warpsocket examples/echo/worker.py --bind 127.0.0.1:0 --threads 2 \
        "${FLAGS[@]}" >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    trap stop_server EXIT

    ADDR=
    for _ in $(seq 300); do
        ADDR=$(sed -n 's/.*listening on \(127\.0\.0\.1:[0-9][0-9]*\).*/\1/p' "$SERVER_LOG" | head -n 1)
        [ -n "$ADDR" ] && break
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    if [ -z "$ADDR" ]; then
        echo "autobahn: the echo server did not start:" >&2
        cat "$SERVER_LOG" >&2
        exit 1
    fi

    ARGS=(-m fuzzingclient -o "$REPORT")
    for c in $CASES; do
        ARGS+=(-i "$c")
    done
    ARGS+=("$ADDR")

    KOSOKU_VERSION_SHOWN=$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("kosoku"))')
    echo "autobahn: kosoku $KOSOKU_VERSION_SHOWN against warpsocket echo ${FLAGS[*]} on $ADDR (cases: $CASES)"
    START=$(date +%s)
    KOSOKU_RC=0
    timeout --signal=INT --kill-after=10 "$RUN_TIMEOUT" \
        "$PYTHON" scripts/kosoku_run.py "${ARGS[@]}" \
        >"$REPORT/kosoku.log" 2>&1 || KOSOKU_RC=$?
    ELAPSED=$(($(date +%s) - START))
    tail -n 20 "$REPORT/kosoku.log"
    echo "autobahn: kosoku finished in ${ELAPSED}s (exit status $KOSOKU_RC)"

    SERVER_ALIVE=1
    kill -0 "$SERVER_PID" 2>/dev/null || SERVER_ALIVE=0
    stop_server
    trap - EXIT

    STATUS=0
    "$PYTHON" scripts/autobahn_summary.py "$REPORT" --expect-groups "$(
        for c in $CASES; do echo "${c%%.*}"; done | sort -un | paste -sd, -
    )" || STATUS=1
    if [ "$KOSOKU_RC" -ne 0 ]; then
        [ "$KOSOKU_RC" -eq 124 ] && echo "autobahn: kosoku ran past ${RUN_TIMEOUT}s" >&2
        STATUS=1
    fi
    if [ "$SERVER_ALIVE" -ne 1 ]; then
        echo "autobahn: the echo server died during the run; its log:" >&2
        tail -n 50 "$SERVER_LOG" >&2
        STATUS=1
    fi
    echo "autobahn: report in $REPORT/index.html"
    return "$STATUS"
}

STATUS_ALL=0
if [ -n "$CASES" ]; then
    run_suite default "$CASES" || STATUS_ALL=1
fi
if [ -n "$DEFLATE_CASES" ]; then
    run_suite compression "$DEFLATE_CASES" --compression || STATUS_ALL=1
fi
exit "$STATUS_ALL"
