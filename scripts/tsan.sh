#!/usr/bin/env bash
# Runs the engine's tests (crates/warpsocket-core: unit tests and tests/*.rs, among them
# tests/concurrent_server.rs, a real server used from many threads at once) under
# ThreadSanitizer, several times.
#
#   scripts/tsan.sh [RUNS] [TEST FILTER...]      # RUNS defaults to 3
#   scripts/tsan.sh 1 many_threads              # one run of the tests whose name has it
#
# Needs the nightly toolchain with its rust-src component (the standard library is rebuilt
# with the sanitizer, -Zbuild-std, so that TSan also sees std's atomics and locks; an
# uninstrumented std gives false reports around Arc and Mutex):
#
#   rustup toolchain install nightly && rustup component add rust-src --toolchain nightly
#
# The build goes to target/tsan so the normal builds are left alone (the first one takes
# several minutes: std, tokio and redis are rebuilt instrumented). Any data race that TSan
# reports makes the run fail (halt_on_error). Not part of .ci/run: it needs the unstable
# -Zsanitizer flag and takes minutes; run it after changing anything that threads share.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=3
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then
    RUNS=$1
    shift
fi
TARGET=x86_64-unknown-linux-gnu

if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    echo "scripts/tsan.sh: needs the nightly toolchain with rust-src:" >&2
    echo "  rustup toolchain install nightly && rustup component add rust-src --toolchain nightly" >&2
    exit 2
fi

export RUSTFLAGS="-Zsanitizer=thread -Cdebuginfo=1"
export CARGO_TARGET_DIR="$PWD/target/tsan"
# halt_on_error: the first report fails the test binary. second_deadlock_stack: both
# stacks of a lock-order inversion.
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ${TSAN_OPTIONS:-}"
# Doc tests are skipped (--lib --tests): rustdoc would need the same flags and they
# exercise no threads.
CARGO=(cargo +nightly test -Zbuild-std --target "$TARGET" -p warpsocket-core --lib --tests)

echo "[tsan] building (target/tsan)"
"${CARGO[@]}" --no-run

failed=0
for run in $(seq 1 "$RUNS"); do
    echo "[tsan] run $run of $RUNS"
    log=$CARGO_TARGET_DIR/run-$run.log
    status=0
    "${CARGO[@]}" -- --nocapture "$@" >"$log" 2>&1 || status=$?
    grep -E '^(test result|WARNING: ThreadSanitizer|SUMMARY: ThreadSanitizer)|connections accepted' "$log" || true
    if [ "$status" -ne 0 ] || grep -q 'ThreadSanitizer' "$log"; then
        echo "[tsan] run $run FAILED (exit $status; log: target/tsan/run-$run.log)"
        failed=$((failed + 1))
    else
        echo "[tsan] run $run passed"
    fi
done
echo "[tsan] $((RUNS - failed)) of $RUNS runs passed without a report"
[ "$failed" -eq 0 ]
