#!/usr/bin/env bash
# Builds a free-threaded CPython 3.13 ("3.13t", configured with --disable-gil) into PREFIX
# from the Debian trixie `python3.13` source package, for testing WarpSocket without the GIL.
#
#   scripts/build-freethreaded-python.sh PREFIX        (e.g. /opt/python3.13t)
#
# Idempotent: when PREFIX/bin/python3.13t already runs (and is free-threaded), it is reused
# and nothing else happens. Otherwise, as root on Debian 12 (bookworm): adds a `deb-src`
# entry for trixie on the Debian mirror apt already uses, installs the few missing build
# dependencies, fetches the source with `apt-get source`, and runs configure / make / make
# install at low priority (about 5.5 minutes on 2 idle cores). Environment knobs:
#   BUILD_DIR  scratch folder for the source tree (default: ${TMPDIR:-/tmp}/build-python3.13t)
#   JOBS       parallel make jobs (default: 2)
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 PREFIX" >&2
    exit 2
fi
PREFIX=$1
case $PREFIX in /*) ;; *) PREFIX="$(pwd)/$PREFIX" ;; esac
PY="$PREFIX/bin/python3.13t"
BUILD_DIR=${BUILD_DIR:-${TMPDIR:-/tmp}/build-python3.13t}
JOBS=${JOBS:-2}

log() { echo "[build-freethreaded-python] $*"; }

works() {
    [ -x "$PY" ] && "$PY" -c '
import sys, sysconfig
assert sys.version_info[:2] == (3, 13), sys.version
assert sysconfig.get_config_var("Py_GIL_DISABLED"), "not a free-threaded build"
assert not sys._is_gil_enabled(), "GIL enabled at startup"
import ssl, ctypes, zlib, bz2, lzma, sqlite3, uuid, venv, ensurepip
' >/dev/null 2>&1
}

if works; then
    log "reusing $PY ($("$PY" -VV | head -1))"
    exit 0
fi
[ -e "$PY" ] && log "$PY exists but does not work as expected: rebuilding"

SUDO=
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "need root (or sudo) for apt-get" >&2; exit 1; }
    SUDO=sudo
fi

# apt may be busy (unattended upgrades, another job): retry a few times instead of failing.
apt_retry() {
    local i
    for i in 1 2 3 4 5 6; do
        if $SUDO apt-get -o DPkg::Lock::Timeout=120 "$@"; then return 0; fi
        log "apt-get $1 failed (try $i), retrying in 20 s"
        sleep 20
    done
    return 1
}

# 1. Build dependencies: only what configure needs for the modules we use (ssl, ctypes,
#    zlib, bz2, lzma, sqlite3, readline, uuid) plus dpkg-dev to unpack the source package.
DEPS="build-essential dpkg-dev xz-utils pkg-config libssl-dev zlib1g-dev libffi-dev libbz2-dev
      liblzma-dev libsqlite3-dev libreadline-dev uuid-dev"
missing=
for p in $DEPS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done

# 2. A deb-src entry for trixie on the mirror apt already uses.
SRC_LIST=/etc/apt/sources.list.d/trixie-src.list
need_update=
if [ -n "$missing" ]; then
    need_update=1
fi
if ! grep -qsE '^deb-src .* trixie( |$)' "$SRC_LIST"; then
    mirror=
    # deb822 files: the URIs of a stanza whose Suites include bookworm (not -security).
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        mirror=$(awk '
            /^[[:space:]]*$/ { if (u != "" && s ~ /(^|[[:space:]])bookworm([[:space:]]|$)/) { print u; exit } u=""; s=""; next }
            /^URIs:/ { u=$2 } /^Suites:/ { s=$0 }
            END { if (u != "" && s ~ /(^|[[:space:]])bookworm([[:space:]]|$)/) print u }' "$f" | head -1)
        [ -n "$mirror" ] && break
    done
    # One-line format: "deb [opts] URL bookworm main".
    if [ -z "$mirror" ]; then
        mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | sed -E 's/\[[^]]*\]//' | awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }')
    fi
    mirror=${mirror:-http://deb.debian.org/debian}
    log "adding 'deb-src $mirror trixie main' as $SRC_LIST"
    echo "deb-src $mirror trixie main" | $SUDO tee "$SRC_LIST" >/dev/null
    need_update=1
elif ! apt-cache showsrc python3.13 2>/dev/null | grep -q '^Package: python3.13'; then
    need_update=1
fi
if [ -n "$need_update" ]; then
    log "apt-get update"
    apt_retry update -q
fi
if [ -n "$missing" ]; then
    log "installing build dependencies:$missing"
    DEBIAN_FRONTEND=noninteractive apt_retry install -y -q --no-install-recommends $missing
fi

# 3. The source, unpacked once into BUILD_DIR (Debian's patches are applied by dpkg-source).
mkdir -p "$BUILD_DIR"
SRC=$(find "$BUILD_DIR" -mindepth 1 -maxdepth 1 -type d -name 'python3.13-3.13*' | sort | tail -1)
if [ -z "$SRC" ] || [ ! -x "$SRC/configure" ]; then
    log "fetching the python3.13 source package into $BUILD_DIR"
    (cd "$BUILD_DIR" && apt_retry source -q python3.13)
    SRC=$(find "$BUILD_DIR" -mindepth 1 -maxdepth 1 -type d -name 'python3.13-3.13*' | sort | tail -1)
    [ -n "$SRC" ] && [ -x "$SRC/configure" ] || { echo "apt-get source did not unpack python3.13" >&2; exit 1; }
fi
log "source: $SRC"

# Debian's packaging patches give its own python a Debian layout, which breaks a plain
# --prefix build: ensurepip refuses to run outside a venv (so `make install` fails), and the
# site.py / sysconfig changes put "lib/python3.13/site-packages" on a venv's sys.path while
# pip installs into "lib/python3.13t/site-packages". Undo just those three patches (the
# CVE and bug-fix patches stay), once.
for p in ensurepip-disabled.diff sysconfig-debian-schemes.diff distutils-install-layout.diff; do
    if (cd "$SRC" && patch -R -p1 -s -f --dry-run <"debian/patches/$p" >/dev/null 2>&1); then
        log "reverting Debian patch $p"
        (cd "$SRC" && patch -R -p1 -s -f --no-backup-if-mismatch <"debian/patches/$p")
    elif ! (cd "$SRC" && patch -p1 -s -f --dry-run <"debian/patches/$p" >/dev/null 2>&1); then
        echo "Debian patch $p is neither applied nor cleanly revertible in $SRC" >&2
        exit 1
    fi
done

# 4. Configure, build, install, out of tree so that a rerun with another PREFIX starts clean.
OBJ="$BUILD_DIR/build-$(echo "$PREFIX" | tr '/' '_')"
mkdir -p "$OBJ"
cd "$OBJ"
start=$(date +%s)
if [ ! -f Makefile ] || ! grep -q -- "--disable-gil" config.log 2>/dev/null; then
    log "configure --disable-gil --prefix=$PREFIX --with-ensurepip=install"
    nice -n 10 "$SRC/configure" --disable-gil --prefix="$PREFIX" --with-ensurepip=install \
        >configure.out 2>&1 || { tail -40 configure.out; exit 1; }
fi
log "make -j$JOBS (nice 10; takes a few minutes)"
nice -n 10 make -j"$JOBS" >make.out 2>&1 || { tail -60 make.out; exit 1; }
log "make install"
nice -n 10 make install >install.out 2>&1 || { tail -60 install.out; exit 1; }
log "built in $(( $(date +%s) - start )) s"

if ! works; then
    echo "$PY was installed but does not pass the checks:" >&2
    "$PY" -VV >&2 || true
    "$PY" -c 'import sys, sysconfig; print(sysconfig.get_config_var("Py_GIL_DISABLED"), sys._is_gil_enabled())' >&2 || true
    "$PY" -c 'import ssl, ctypes, zlib, bz2, lzma, sqlite3, uuid, venv, ensurepip' >&2 || true
    exit 1
fi
log "ready: $PY ($("$PY" -VV | head -1))"
