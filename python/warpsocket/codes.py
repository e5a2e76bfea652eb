"""The numbers the Python layer shares with the engine, as ``IntEnum`` classes.

Each value comes from the engine's own table in ``_core`` (``HANDLER_KINDS``,
``CLOSE_CODES``, ``REFUSAL_STATUSES``), where the core defines it once. The
members are written out here only because a type checker cannot see members
made at run time; a member missing from the engine's table fails the import,
and ``tests/test_shared_names.py`` fails on one the engine has and this module
lacks.
"""

from __future__ import annotations

from enum import IntEnum

from . import _core

_KINDS = dict(_core.HANDLER_KINDS)
_CLOSES = dict(_core.CLOSE_CODES)
_STATUSES = dict(_core.REFUSAL_STATUSES)


class HandlerKind(IntEnum):
    """The event a handler runs for: the ``kind`` of the worker queue's events.

    Also the index that ``HandlerTimings.record`` takes; the lower-case name is the
    ``handler`` label of the handler histograms.
    """

    OPEN = _KINDS["OPEN"]
    TEXT = _KINDS["TEXT"]
    BINARY = _KINDS["BINARY"]
    CLOSE = _KINDS["CLOSE"]
    PRESENCE = _KINDS["PRESENCE"]


class CloseCode(IntEnum):
    """Close codes the server sends (RFC 6455 §7.4.1), as counted in ``stats()["closes"]``.

    ``NO_CODE`` (1005) is never sent: ``stats()["closes"]`` counts a close frame
    without a code under it.
    """

    NORMAL = _CLOSES["NORMAL"]
    GOING_AWAY = _CLOSES["GOING_AWAY"]
    PROTOCOL = _CLOSES["PROTOCOL"]
    UNSUPPORTED = _CLOSES["UNSUPPORTED"]
    NO_CODE = _CLOSES["NO_CODE"]
    INVALID_DATA = _CLOSES["INVALID_DATA"]
    POLICY = _CLOSES["POLICY"]
    TOO_BIG = _CLOSES["TOO_BIG"]
    INTERNAL = _CLOSES["INTERNAL"]


class RefusalStatus(IntEnum):
    """HTTP statuses an upgrade request is refused with, as counted in ``stats()["handshakes_refused"]``.

    ``FORBIDDEN`` when ``handle_open`` returns a false value, ``INTERNAL_ERROR`` when it
    raises or times out; the others come from the handshake itself.
    """

    BAD_REQUEST = _STATUSES["BAD_REQUEST"]
    FORBIDDEN = _STATUSES["FORBIDDEN"]
    UPGRADE_REQUIRED = _STATUSES["UPGRADE_REQUIRED"]
    TOO_MANY_REQUESTS = _STATUSES["TOO_MANY_REQUESTS"]
    HEADERS_TOO_LARGE = _STATUSES["HEADERS_TOO_LARGE"]
    INTERNAL_ERROR = _STATUSES["INTERNAL_ERROR"]
    UNAVAILABLE = _STATUSES["UNAVAILABLE"]
