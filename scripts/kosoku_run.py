#!/usr/bin/env python3
"""Run kosoku 0.1.0 (the Autobahn fuzzing client) with one bug of its 12.x/13.x cases fixed.

Usage: kosoku_run.py [kosoku arguments...]   (the same arguments as the ``kosoku`` command)

RFC 7692 lets a server send any message of a permessage-deflate connection uncompressed
(RSV1 clear). kosoku 0.1.0 hands such a message to the case's ``onMessage`` as ``str``
(its Rust driver bridges uncompressed payloads to ``str`` for the older cases, which
compare ``str`` literals) but a compressed one as ``bytes``. The compression cases
(``case12_x_x.onMessage``, shared by every 12.x and 13.x case) feed the message to
``hashlib.sha1().update``, which raises "Strings must be encoded before hashing" for a
``str``, so every uncompressed echo fails the case.

The fix turns the ``str`` back into the exact octets that were on the wire before the
case's own ``onMessage`` runs, unchanged: kosoku decodes a binary payload as Latin-1
(one code point per octet), so ``encode("latin-1")`` is its inverse; a text payload as
UTF-8 when it is valid, so ``encode("utf-8")`` is its inverse. Text that was not valid
UTF-8 (kosoku falls back to Latin-1 for it) encodes to other octets, so its hash, and the
case, fails as it should. Every check of the case (message type, length, SHA-1 of the
payload, the close) then runs on the same bytes as for a compressed echo. Nothing else
in kosoku is touched. See docs/conformance.md.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Callable
from typing import Any

KOSOKU_VERSION = "0.1.0"


def wire_bytes(msg: bytes | str, binary: bool) -> bytes:
    """The octets kosoku received for ``msg`` (the inverse of its ``str`` bridge)."""
    if isinstance(msg, bytes):
        return msg
    return msg.encode("latin-1" if binary else "utf-8")


def patch_compression_cases() -> int:
    """Give every 12.x/13.x case an ``onMessage`` that gets bytes; return how many."""
    import kosoku.cases  # noqa: F401  (puts kosoku's case modules on sys.path)

    # kosoku's vendored case module, importable only once kosoku.cases is.
    case12_x_x = importlib.import_module("case12_x_x")

    original: Callable[[Any, bytes, bool], None] = case12_x_x.onMessage

    def on_message(self: Any, msg: bytes | str, binary: bool) -> None:
        original(self, wire_bytes(msg, binary), binary)

    classes = [*case12_x_x.Case12_X_X, *case12_x_x.Case13_X_X]
    for cls in classes:
        # Each class got the module's function in its namespace; anything else
        # means a kosoku this fix was not written for.
        if cls.__dict__.get("onMessage") is not original:
            raise SystemExit(f"kosoku_run: {cls.__name__}.onMessage is not case12_x_x.onMessage")
        cls.onMessage = on_message
    return len(classes)


def main() -> None:
    """Patch the compression cases, then run kosoku's command line."""
    version = importlib.metadata.version("kosoku")
    if version != KOSOKU_VERSION:
        raise SystemExit(f"kosoku_run: written for kosoku {KOSOKU_VERSION}, found {version}")
    patch_compression_cases()
    from kosoku._cli import main as kosoku_main

    sys.argv[0] = "kosoku"
    kosoku_main()


if __name__ == "__main__":
    main()
