#!/usr/bin/env bash
# Runs the pytest suite on free-threaded CPython 3.13t (no GIL), in .venv-ft.
#
#   scripts/test-freethreaded.sh [PREFIX] [PYTEST ARGS...]
#
# PREFIX (an absolute path; default /opt/python3.13t, or $FT_PREFIX) is where the
# interpreter lives: scripts/build-freethreaded-python.sh builds it there unless it is
# already there. Then: a venv .venv-ft with that interpreter, WarpSocket and its test
# extras installed into it (a version-specific cp313t wheel, built in target/freethreaded so
# the normal build in target/ is left alone; or the wheel file $FT_WHEEL), checks that the
# GIL stays off, and pytest.
# Example: scripts/test-freethreaded.sh tests/test_concurrency.py -x
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${FT_PREFIX:-/opt/python3.13t}
if [ $# -gt 0 ] && [ "${1#/}" != "$1" ]; then
    PREFIX=$1
    shift
fi
[ "${1:-}" = "--" ] && shift
VENV=.venv-ft
PY=$VENV/bin/python

log() { echo "[test-freethreaded] $*"; }

# 1. The interpreter (reused when it is already built).
scripts/build-freethreaded-python.sh "$PREFIX"
BASE="$PREFIX/bin/python3.13t"

# 2. The venv, recreated when it was made with another interpreter.
if [ -x "$PY" ] && [ "$("$PY" -c 'import sys; print(sys.base_prefix)' 2>/dev/null)" = "$("$BASE" -c 'import sys; print(sys.prefix)')" ]; then
    log "reusing $VENV"
else
    log "creating $VENV with $BASE"
    rm -rf "$VENV"
    "$BASE" -m venv "$VENV"
fi

# 3. WarpSocket and the test tools. PyO3 ignores the abi3 feature for a free-threaded
#    interpreter, so this wheel is cp313-cp313t. With FT_WHEEL set (.ci/run: the one
#    scripts/build-wheels.sh put in dist/) that wheel is installed instead of a new build.
export CARGO_TARGET_DIR="$PWD/target/freethreaded"
log "installing WarpSocket into $VENV (${FT_WHEEL:-built from source, cargo target dir: target/freethreaded})"
"$PY" -m pip install -q --upgrade pip
# Hypothesis ships compiled wheels from 6.156 on, built with a PyO3 that refuses
# free-threaded 3.13 (it needs 3.14t), so pip would try and fail to build it from source
# here; 6.155.7 is the last pure-Python release and has everything the tests use.
"$PY" -m pip install -q "${FT_WHEEL:-.}[test]" "hypothesis<6.156"

# 4. The GIL must stay off: importing warpsocket, the test tools, running a server.
unset PYTHON_GIL
log "checking that the GIL stays disabled"
"$PY" - <<'EOF'
import sys, sysconfig

assert sysconfig.get_config_var("Py_GIL_DISABLED"), "not a free-threaded interpreter"
assert not sys._is_gil_enabled(), "GIL enabled at startup"

import warpsocket
import warpsocket._core as core

assert not sys._is_gil_enabled(), "importing warpsocket enabled the GIL"
assert "cpython-313t" in core.__file__, f"not a version-specific 3.13t build: {core.__file__}"

# Everything the test suite imports, C extensions included (websockets.speedups).
import pytest, pytest_timeout, websockets, websockets.sync.client, websockets.asyncio.client  # noqa: E401,F401
try:
    import websockets.speedups  # noqa: F401
except ImportError:
    pass
assert not sys._is_gil_enabled(), "importing the test tools enabled the GIL"

import os, tempfile, textwrap
from websockets.sync.client import connect

with tempfile.TemporaryDirectory() as tmp:
    worker = os.path.join(tmp, "ft_echo_worker.py")
    with open(worker, "w") as f:
        f.write(textwrap.dedent("""
            import warpsocket
            def handle_text_message(text, socket_id):
                warpsocket.send(socket_id, text)
            async def handle_binary_message(data, socket_id):
                warpsocket.send(socket_id, data)
        """))
    with warpsocket.start("127.0.0.1:0", worker, threads=2) as server:
        for _ in range(4):
            with connect(f"ws://127.0.0.1:{server.port}") as ws:
                ws.send("hello")
                assert ws.recv(timeout=10) == "hello"
                ws.send(b"\x00\x01")
                assert ws.recv(timeout=10) == b"\x00\x01"
        assert not sys._is_gil_enabled(), "running a server enabled the GIL"
assert not sys._is_gil_enabled(), "stopping the server enabled the GIL"
print(f"GIL disabled: {sys.version.split()[0]} free-threaded, {os.path.basename(core.__file__)}")
EOF

# 5. The suite, with the interpreter's default (GIL off, PYTHON_GIL not set).
# tests/test_tls.py needs `cryptography` (via trustme) for its test CA, and cryptography
# publishes no free-threaded 3.13 wheel: building it here would need OpenSSL's headers and
# would load a module that re-enables the GIL. The TLS code is the same Rust on both builds.
# tests/test_notify_example.py runs a FastAPI app: pydantic-core, under it, has no wheel for
# the free-threaded 3.13 that pip picks, and its source build refuses 3.13t.
echo "[test-freethreaded] NOT RUN on 3.13t: tests/test_tls.py (cryptography has no cp313t wheel); scripts/test.sh runs it" >&2
echo "[test-freethreaded] NOT RUN on 3.13t: tests/test_notify_example.py (pydantic-core, under FastAPI, has no cp313t wheel); scripts/test.sh runs it" >&2
log "running pytest on $("$PY" -VV | head -1)"
exec "$PY" -m pytest -q --ignore=tests/test_tls.py --ignore=tests/test_notify_example.py "$@"
