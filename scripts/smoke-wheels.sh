#!/usr/bin/env bash
# The smoke test a packager runs on the artifacts of scripts/build-wheels.sh:
#
#   scripts/smoke-wheels.sh [DIST]          (default: dist)
#
# 1. The x86_64 abi3 wheel, into a fresh venv, with no Rust toolchain on PATH (checked:
#    `cargo` and `rustc` are not found) and pip allowed wheels only (--only-binary), so
#    nothing is compiled; from the network only the wheel's dependencies and the
#    `websockets` client come.
# 2. The sdist, into another fresh venv, on this machine with its Rust toolchain: pip
#    builds it from source (maturin from PyPI, a release build: minutes).
# Before both, it checks that every wheel and the sdist in DIST carry LICENSE.
# Each venv then starts a server (`warpsocket.start`, an echo worker, port 0), talks to
# it with `websockets` (text and binary), stops it, and checks that `__version__` and
# `warpsocket --version` are the artifact's version. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

DIST=${1:-dist}
PYTHON=$(${PYTHON:-python3} -c 'import sys; print(sys.executable)')
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

log() { echo "[smoke-wheels] $*"; }

one() {
    local files=("$DIST"/$1)
    if [ ${#files[@]} -ne 1 ] || [ ! -f "${files[0]}" ]; then
        echo "[smoke-wheels] expected one $1 in $DIST (run scripts/build-wheels.sh)" >&2
        exit 1
    fi
    realpath "${files[0]}"
}
wheel=$(one "warpsocket-*-cp310-abi3-*_x86_64.whl")
sdist=$(one "warpsocket-*.tar.gz")
version=$(basename "$wheel" | cut -d- -f2)

# Every artifact carries the license text (MIT, as the metadata says).
"$PYTHON" - "$DIST" <<'EOF'
import pathlib
import sys
import tarfile
import zipfile

license_text = pathlib.Path("LICENSE").read_text()
artifacts = sorted(pathlib.Path(sys.argv[1]).glob("warpsocket-*"))
for artifact in artifacts:
    if artifact.suffix == ".whl":
        with zipfile.ZipFile(artifact) as wheel:
            names = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
            found = [wheel.read(n).decode() for n in names]
    else:
        with tarfile.open(artifact) as sdist:
            members = [m for m in sdist.getmembers() if m.name.count("/") == 1 and m.name.endswith("/LICENSE")]
            found = [sdist.extractfile(m).read().decode() for m in members]
    assert found == [license_text], f"{artifact.name}: no LICENSE, or not this one"
print(f"[smoke-wheels] LICENSE in all {len(artifacts)} artifacts")
EOF

# Start a server from the venv $1, talk to it, stop it; run from $WORK so that nothing
# of this checkout can be imported instead of what was installed.
smoke() {
    local venv=$1
    (cd "$WORK" && "$venv/bin/python" - "$version" "$venv" <<'EOF'
import os
import socket
import sys

import warpsocket
import warpsocket._core
from websockets.sync.client import connect

version, venv = sys.argv[1], os.path.realpath(sys.argv[2])
assert warpsocket.__version__ == version, (warpsocket.__version__, version)
assert os.path.realpath(warpsocket._core.__file__).startswith(venv + os.sep), warpsocket._core.__file__

with open("smoke_worker.py", "w") as f:
    f.write(
        "import warpsocket\n"
        "def handle_text_message(text, socket_id):\n"
        "    warpsocket.send(socket_id, text)\n"
        "async def handle_binary_message(data, socket_id):\n"
        "    warpsocket.send(socket_id, data)\n"
    )
with warpsocket.start("127.0.0.1:0", "smoke_worker.py", threads=2) as server:
    port = server.port
    with connect(f"ws://127.0.0.1:{port}") as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        ws.send(b"\x00\xff")
        assert ws.recv(timeout=10) == b"\x00\xff"
try:
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    raise AssertionError(f"port {port} still accepts connections after stop()")
except ConnectionRefusedError:
    pass
print(f"server on port {port} echoed text and binary, then stopped ({os.path.basename(warpsocket._core.__file__)})")
EOF
    )
    local reported
    reported=$("$venv/bin/warpsocket" --version)
    [ "$reported" = "warpsocket $version" ] || {
        echo "[smoke-wheels] warpsocket --version said '$reported', expected 'warpsocket $version'" >&2
        exit 1
    }
}

# 1. The wheel, without Rust: PATH keeps no folder that has cargo, rustc or rustup.
norust=
IFS=: read -ra dirs <<<"$PATH"
for dir in "${dirs[@]}"; do
    [ -e "$dir/cargo" ] || [ -e "$dir/rustc" ] || [ -e "$dir/rustup" ] || norust=${norust:+$norust:}$dir
done
if env PATH="$norust" bash -c 'command -v cargo || command -v rustc'; then
    echo "[smoke-wheels] a Rust toolchain is still on PATH" >&2
    exit 1
fi
log "wheel: $(basename "$wheel") into a fresh venv, no cargo or rustc on PATH"
"$PYTHON" -m venv "$WORK/wheel-venv"
env PATH="$norust" CARGO_HOME=/nonexistent RUSTUP_HOME=/nonexistent bash -c '
    set -euo pipefail
    "$1/bin/python" -m pip install -q --disable-pip-version-check --only-binary :all: "$2" websockets
' _ "$WORK/wheel-venv" "$wheel"
PATH="$norust" smoke "$WORK/wheel-venv"

# 2. The sdist, built from source with this machine's Rust.
log "sdist: $(basename "$sdist") into a fresh venv, built with $(cargo --version)"
"$PYTHON" -m venv "$WORK/sdist-venv"
start=$SECONDS
"$WORK/sdist-venv/bin/python" -m pip install -q --disable-pip-version-check "$sdist" websockets
log "sdist built and installed in $((SECONDS - start)) s"
smoke "$WORK/sdist-venv"
log "wheel and sdist passed"
