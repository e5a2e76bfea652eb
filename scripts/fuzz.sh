#!/usr/bin/env bash
# Fuzzes warpsocket-core's parsers of untrusted bytes with cargo-fuzz (libFuzzer + ASan):
#   frame_decoder  arbitrary bytes, split at arbitrary points, into frame::Decoder::feed
#   handshake      arbitrary bytes into handshake::parse
#   cluster_wire   arbitrary bytes into the cluster wire decoder (cluster::reencode_message)
# Each target runs for a bounded time; any crash, assertion, leak, slow input (-timeout)
# or allocation above the RSS limit fails the script. See docs/conformance.md.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 60)
#
# Environment: FUZZ_TARGETS (default "frame_decoder handshake cluster_wire"), FUZZ_RSS_MB (default 512).
# Only stable Rust is needed: cargo-fuzz's nightly flags are enabled with RUSTC_BOOTSTRAP=1.
# New corpus entries go to fuzz/corpus/TARGET (git-ignored), crashes to fuzz/artifacts/TARGET;
# the committed seeds are fuzz/seeds/TARGET, the dictionaries fuzz/TARGET.dict.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

SECONDS_PER_TARGET=${1:-60}
TARGETS=${FUZZ_TARGETS:-"frame_decoder handshake cluster_wire"}
RSS_MB=${FUZZ_RSS_MB:-512}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cargo fuzz build  # every target at once

STATUS=0
SUMMARY=()
for target in $TARGETS; do
    mkdir -p "corpus/$target" "artifacts/$target"
    log="artifacts/$target/last-run.log"
    echo "fuzz: $target for ${SECONDS_PER_TARGET}s (rss limit ${RSS_MB} MB)"
    rc=0
    cargo fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb="$RSS_MB" -timeout=10 \
        -dict="$target.dict" -print_final_stats=1 >"$log" 2>&1 || rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)
    if [ "$rc" -ne 0 ]; then
        STATUS=1
        echo "fuzz: $target FAILED (exit status $rc); the end of its log ($log):" >&2
        tail -n 60 "$log" >&2
        SUMMARY+=("$target: FAILED after ${runs:-?} executions, see fuzz/$log and fuzz/artifacts/$target/")
    else
        SUMMARY+=("$target: ok, ${runs:-?} executions in ${SECONDS_PER_TARGET}s, ${cov:-cov: ?}")
    fi
done
printf 'fuzz: %s\n' "${SUMMARY[@]}"
exit "$STATUS"
