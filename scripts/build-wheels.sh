#!/usr/bin/env bash
# Builds the release artifacts into dist/ (or OUT_DIR), from a clean clone:
#
#   warpsocket-V-cp310-abi3-manylinux_2_17_x86_64.whl    CPython >= 3.10 (GIL builds), x86_64
#   warpsocket-V-cp310-abi3-manylinux_2_17_aarch64.whl   the same for aarch64 (cross-compiled)
#   warpsocket-V-cp313-cp313t-manylinux_2_17_x86_64.whl  free-threaded CPython 3.13t, x86_64
#   warpsocket-V.tar.gz                                   the sdist (needs Rust to install)
#
#   scripts/build-wheels.sh [OUT_DIR]
#
# manylinux_2_17 (manylinux2014, glibc 2.17) is the oldest tag the build allows: it is the
# floor of Rust's own *-linux-gnu targets (std needs glibc >= 2.17), and no dependency
# raises it (ring's C and assembly, zlib-rs, tokio and mio use only older glibc symbols).
# Zig links against glibc 2.17's symbol versions, so no manylinux container is needed;
# `auditwheel show` then checks every wheel against that tag.
#
# Needs: Python >= 3.10 with venv, rustup (adds the aarch64 target when missing), and
# /opt/python3.13t (or $FT_PREFIX), which scripts/build-freethreaded-python.sh builds
# when it is missing. The build tools (maturin, ziglang, auditwheel, twine; pinned) go
# into .venv-build. Each wheel's Rust build has a target folder of its own under
# target/wheels, so a rerun rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-dist}
FT_PREFIX=${FT_PREFIX:-/opt/python3.13t}
PYTHON=${PYTHON:-python3}
VENV=.venv-build
TAG=manylinux_2_17

log() { echo "[build-wheels] $*"; }

# 1. Build tools. Exact pins: the glibc baseline and the wheels' tags depend on them.
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "maturin==1.16.0" "ziglang==0.17.1" "auditwheel==6.8.2" "twine==7.0.0"
# maturin finds zig through the ziglang package of the Python it runs under.
export PATH="$PWD/$VENV/bin:$PATH"

# 2. The aarch64 standard library, and the free-threaded interpreter.
rustup target list --installed | grep -qx aarch64-unknown-linux-gnu \
    || rustup target add aarch64-unknown-linux-gnu
scripts/build-freethreaded-python.sh "$FT_PREFIX"

# 3. The artifacts. Old ones of this project go first: dist/ holds exactly this build.
mkdir -p "$OUT"
rm -f "$OUT"/warpsocket-*.whl "$OUT"/warpsocket-*.tar.gz
build() {
    local name=$1
    shift
    log "building $name"
    CARGO_TARGET_DIR="$PWD/target/wheels/$name" maturin build --release --zig \
        --compatibility "$TAG" --out "$OUT" "$@"
}
build abi3-x86_64 --target x86_64-unknown-linux-gnu
build abi3-aarch64 --target aarch64-unknown-linux-gnu
# PyO3 ignores its abi3 feature for a free-threaded interpreter: this one is cp313t.
build cp313t-x86_64 --target x86_64-unknown-linux-gnu --interpreter "$FT_PREFIX/bin/python3.13t"
log "building the sdist"
maturin sdist --out "$OUT"

# 4. Checks: exactly the four artifacts, each wheel consistent with the tag (auditwheel
#    reads the ELF's symbol versions and libraries), and metadata PyPI would accept.
shopt -s nullglob
expect_one() {
    local files=("$OUT"/$1)
    if [ ${#files[@]} -ne 1 ]; then
        echo "[build-wheels] expected one $1 in $OUT, found ${#files[@]}" >&2
        exit 1
    fi
    echo "${files[0]}"
}
wheels=(
    "$(expect_one "warpsocket-*-cp310-abi3-*${TAG}_x86_64*.whl")"
    "$(expect_one "warpsocket-*-cp310-abi3-*${TAG}_aarch64*.whl")"
    "$(expect_one "warpsocket-*-cp313-cp313t-*${TAG}_x86_64*.whl")"
)
sdist=$(expect_one "warpsocket-*.tar.gz")
for wheel in "${wheels[@]}"; do
    case $wheel in
        *_aarch64.whl) arch=aarch64 ;;
        *) arch=x86_64 ;;
    esac
    report=$(auditwheel show "$wheel")
    if ! grep -q "consistent with the following platform tag:" <<<"$report" \
        || ! grep -q "\"${TAG}_${arch}\"" <<<"$report"; then
        echo "$report" >&2
        echo "[build-wheels] $wheel is not consistent with ${TAG}_${arch}" >&2
        exit 1
    fi
    log "auditwheel: $(basename "$wheel") is ${TAG}_${arch}"
done
twine check --strict "${wheels[@]}" "$sdist"

log "built into $OUT:"
for file in "${wheels[@]}" "$sdist"; do
    printf '  %8s KiB  %s\n' "$(($(stat -c %s "$file") / 1024))" "$(basename "$file")"
done
