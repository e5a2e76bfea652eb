"""Server options, defined once.

The signature of :meth:`Options.build` is the one list of options: their names, types,
defaults and (for the tunables) help texts. ``start()`` and ``run()`` take exactly these
parameters (see :func:`takes_options`), and the CLI makes a ``--flag`` of every tunable
(:data:`TUNABLES`). :class:`Options` holds the checked values.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple, ParamSpec, TypeVar

from .addresses import parse_bind

MiB = 1024 * 1024
#: Default of the two size limits.
SIZE_LIMIT = 16 * MiB
#: Longest duration an option (or ``stop``/``wait``) takes: a year.
MAX_SECONDS = 365 * 24 * 3600.0
#: Most worker threads a server may have.
MAX_THREADS = 1024

P = ParamSpec("P")
R = TypeVar("R")


class History(NamedTuple):
    """What a history channel keeps (docs/api.md#history): the ``history`` option's values.

    ``size``: the latest messages kept (at least 1); ``ttl``: seconds each is kept, and
    how long a channel's sequence lives without a message; ``stamp``: every delivery
    carries its offset (``"17:"`` before the data). A plain tuple works too.
    """

    size: int
    ttl: float = 300.0
    stamp: bool = True


#: The ``history`` option: prefixes (``str`` or ``bytes``, checked when it is used) to
#: policies. The keys are typed ``Any`` because a mapping's key type is invariant:
#: ``dict[str, History]`` would not match ``Mapping[str | bytes, ...]``.
HistoryOption = Mapping[Any, History | tuple[Any, ...]]


#: A channel-name prefix and what its channels keep, as ``Options.history`` holds them.
HistoryRule = tuple[str | bytes, History]


def default_threads() -> int:
    """Worker threads when none are asked for: one per CPU, at least 4."""
    return max(os.cpu_count() or 1, 4)


@dataclass(frozen=True)
class Options:
    """Validated server options (docs/api.md#options); made by :meth:`build`."""

    bind: tuple[str, ...]
    worker: str
    threads: int
    worker_arg: Any
    static_dir: str | None
    cluster: str | None
    tls_cert: str | None
    tls_key: str | None
    handler_timeout: float
    hang_timeout: float
    max_message_size: int
    max_backpressure: int
    ping_interval: float
    ping_timeout: float
    max_pending_upgrades: int
    metrics_bind: str | None
    compression: bool
    history: tuple[HistoryRule, ...] = ()
    max_message_rate: float | None = None
    max_connections: int | None = None
    max_connections_per_ip: int | None = None

    @classmethod
    def build(
        cls,
        bind: str | list[str],
        worker: str | os.PathLike[str],
        threads: int | None = None,
        worker_arg: Any = None,
        static_dir: str | os.PathLike[str] | None = None,
        cluster: str | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        *,
        handler_timeout: Annotated[float, "seconds an async handler may run"] = 5.0,
        hang_timeout: Annotated[float, "seconds a worker may leave its events waiting"] = 3.0,
        max_message_size: Annotated[int, "largest incoming message in bytes (else 1009)"] = SIZE_LIMIT,
        max_backpressure: Annotated[
            int, "queued outgoing bytes per connection before closing with 1008"
        ] = SIZE_LIMIT,
        ping_interval: Annotated[float, "seconds between keepalive pings"] = 20.0,
        ping_timeout: Annotated[float, "seconds to wait for a keepalive answer (else 1011)"] = 20.0,
        max_pending_upgrades: Annotated[
            int,
            "connections allowed in their handshake at once; when full, the longest-waiting"
            " handshake of the address holding the most makes room",
        ] = 1024,
        metrics_bind: Annotated[
            str | None,
            "serve Prometheus /metrics and /healthz over plain HTTP on this address, e.g. 127.0.0.1:9100",
            Flag("--metrics", "ADDR"),
        ] = None,
        compression: Annotated[
            bool, "negotiate permessage-deflate with clients that offer it (docs/api.md#compression)"
        ] = False,
        history: Annotated[
            HistoryOption | None,
            "keep the last SIZE messages (each for TTL seconds, default 300) of the channels"
            " whose name starts with PREFIX, for recover() (docs/api.md#history); repeatable",
            Flag("--history", "PREFIX=SIZE[/TTL]", parse=parse_history_flag, repeat=True),
        ] = None,
        max_message_rate: Annotated[
            float | None,
            "messages per second one connection may send, with a burst of that many; a faster"
            " one is closed with 1008 'rate limit' (docs/api.md#fairness-and-abuse-limits)",
        ] = None,
        max_connections: Annotated[
            int | None, "open connections the server takes; more upgrades get HTTP 503"
        ] = None,
        max_connections_per_ip: Annotated[
            int | None,
            "open connections one address (an IPv6 /64) may hold; more upgrades get HTTP 429",
        ] = None,
    ) -> Options:
        """Check every argument and return the options, raising TypeError/ValueError."""
        binds = _check_bind(bind)
        if isinstance(worker, os.PathLike):
            worker = os.fspath(worker)
        if not isinstance(worker, str):
            raise TypeError("worker must be a file path or a module name (str)")
        if not worker:
            raise ValueError("worker must not be empty")
        _check_path("worker", worker)
        if static_dir is not None:
            static_dir = _check_static_dir(static_dir)
        if cluster is not None:
            if not isinstance(cluster, str):
                raise TypeError(f"cluster must be a Redis URL (str) or None, not {type(cluster).__name__}")
            _check_text("cluster", cluster)
            if not cluster.startswith(("redis://", "unix://", "redis+unix://")):
                raise ValueError(f"cluster must be a redis:// URL, got {cluster!r}")
        if threads is None:
            threads = default_threads()
        _check_int("threads", threads, MAX_THREADS)
        if metrics_bind is not None:
            parse_bind(metrics_bind)
        rules = _check_history(history)
        return cls(
            bind=binds,
            worker=worker,
            threads=threads,
            worker_arg=worker_arg,
            static_dir=static_dir,
            cluster=cluster,
            tls_cert=_check_file("tls_cert", tls_cert),
            tls_key=_check_file("tls_key", tls_key),
            handler_timeout=check_seconds("handler_timeout", handler_timeout),
            hang_timeout=check_seconds("hang_timeout", hang_timeout),
            max_message_size=_check_int("max_message_size", max_message_size, sys.maxsize),
            max_backpressure=_check_int("max_backpressure", max_backpressure, sys.maxsize),
            ping_interval=check_seconds("ping_interval", ping_interval),
            ping_timeout=check_seconds("ping_timeout", ping_timeout),
            max_pending_upgrades=_check_int("max_pending_upgrades", max_pending_upgrades, sys.maxsize),
            metrics_bind=metrics_bind,
            compression=_check_bool("compression", compression),
            history=rules,
            max_message_rate=_check_rate("max_message_rate", max_message_rate),
            max_connections=_check_optional_int("max_connections", max_connections),
            max_connections_per_ip=_check_optional_int("max_connections_per_ip", max_connections_per_ip),
        )


def _check_bind(bind: object) -> tuple[str, ...]:
    if isinstance(bind, str):
        binds: tuple[str, ...] = (bind,)
    elif isinstance(bind, (list, tuple)) and all(isinstance(b, str) for b in bind):
        binds = tuple(bind)
    else:
        raise TypeError("bind must be an address string or a list of them")
    if not binds:
        raise ValueError("bind must name at least one address")
    for address in binds:
        _check_text("bind", address)
    return binds


def _check_history(history: object) -> tuple[HistoryRule, ...]:
    """The ``history`` option as (prefix, :class:`History`) pairs, checked."""
    if history is None:
        return ()
    if not isinstance(history, Mapping):
        raise TypeError(f"history must be a dict of channel prefix -> History, not {type(history).__name__}")
    rules: list[HistoryRule] = []
    for prefix, policy in history.items():
        if isinstance(prefix, str):
            _check_text("history's prefix", prefix)
        elif not isinstance(prefix, bytes):
            raise TypeError(f"history's prefixes must be str or bytes, not {type(prefix).__name__}")
        rules.append((prefix, _check_policy(f"history[{prefix!r}]", policy)))
    return tuple(rules)


def check_history(history: object) -> tuple[HistoryRule, ...]:
    """The ``history`` option (of ``start()``, or of ``Cluster``) as (prefix, :class:`History`) pairs.

    Raises TypeError or ValueError, naming the part at fault, as ``start()`` does.
    """
    return _check_history(history)


def _check_policy(name: str, policy: object) -> History:
    if not isinstance(policy, tuple):
        raise TypeError(f"{name} must be a History (or a tuple), not {type(policy).__name__}")
    if not 1 <= len(policy) <= len(History._fields):
        raise ValueError(f"{name} must be (size, ttl=300.0, stamp=True), got {len(policy)} items")
    given = History(*policy)
    return History(
        size=_check_int(f"{name}.size", given.size, sys.maxsize),
        ttl=check_seconds(f"{name}.ttl", given.ttl),
        stamp=_check_bool(f"{name}.stamp", given.stamp),
    )


def parse_history_flag(text: str) -> tuple[str, History]:
    """``--history PREFIX=SIZE[/TTL]`` as a (prefix, :class:`History`) pair; ValueError if malformed."""
    prefix, equals, policy = text.rpartition("=")
    if not equals:
        raise ValueError(f"--history takes PREFIX=SIZE[/TTL], got {text!r}")
    size, slash, ttl = policy.partition("/")
    rule = History(int(size), float(ttl) if slash else 300.0)
    return prefix, _check_policy("--history", rule)


def _check_text(name: str, value: str) -> None:
    """A str the engine takes as UTF-8: a lone surrogate has no UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} must be text that UTF-8 can encode, got {value!r}") from None


def _check_path(name: str, value: str) -> None:
    """A path the file system can take (``os.fsencode``: undecodable bytes are fine)."""
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        raise ValueError(f"{name} must be a path the file system can encode, got {value!r}") from None


def _check_static_dir(static_dir: object) -> str:
    if isinstance(static_dir, os.PathLike):
        static_dir = os.fspath(static_dir)
    if not isinstance(static_dir, str):
        raise TypeError("static_dir must be a folder path (str) or None")
    _check_path("static_dir", static_dir)
    if not os.path.isdir(static_dir):
        raise ValueError(f"static_dir {static_dir!r} is not an existing folder")
    return os.path.abspath(static_dir)


def _check_file(name: str, value: object) -> str | None:
    # Whether the file exists, is PEM and matches is checked when the server loads
    # it (ValueError naming the argument), before anything is bound.
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a file path (str) or None, not {type(value).__name__}")
    _check_path(name, value)
    return value


def _check_int(name: str, value: object, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 < value <= maximum:
        raise ValueError(f"{name} must be between 1 and {maximum}, got {_show(value)}")
    return value


def _check_optional_int(name: str, value: object) -> int | None:
    return None if value is None else _check_int(name, value, sys.maxsize)


#: Highest ``max_message_rate``: beyond it, a limit could never be reached.
MAX_RATE = 1e9


def _check_rate(name: str, value: object) -> float | None:
    """``value`` as messages per second (``None``: no limit): finite, above 0, up to :data:`MAX_RATE`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of messages per second or None, not {type(value).__name__}")
    try:
        rate = float(value)
    except OverflowError:  # an int too large for a float
        rate = math.inf
    if not (math.isfinite(rate) and 0 < rate <= MAX_RATE):
        raise ValueError(f"{name} must be above 0 and at most {MAX_RATE:.0f}, got {_show(value)}")
    return rate


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
    return value


def check_seconds(name: str, value: object, *, positive: bool = True) -> float:
    """``value`` as seconds: a finite number up to :data:`MAX_SECONDS` (and > 0 if ``positive``).

    Raises TypeError for a non-number (bool included), ValueError naming ``name`` otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds > MAX_SECONDS:
        raise ValueError(
            f"{name} must be a finite number of seconds up to {MAX_SECONDS:.0f}, got {_show(value)}"
        )
    if positive and not seconds > 0:
        raise ValueError(f"{name} must be positive, got {_show(value)}")
    return seconds


def _show(value: object) -> str:
    """``value`` for an error message: ints too long to print whole are described."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an int of {value.bit_length()} bits"
    return repr(value)


@dataclass(frozen=True)
class Flag:
    """In a keyword-only option's ``Annotated``: its CLI flag, when not ``--<name>``.

    ``parse`` turns the flag's text into a value (for an option that is not an int,
    float, bool or str); with ``repeat``, each use gives a ``(key, value)`` pair and the
    option is the dict of them.
    """

    flag: str
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None
    repeat: bool = False


@dataclass(frozen=True)
class Tunable:
    """One keyword-only option of :meth:`Options.build` (a CLI ``--flag``)."""

    name: str
    #: What the CLI converts the flag's text with (``X`` for an ``X | None`` option).
    type: type[int] | type[float] | type[bool] | type[str] | Callable[[str], Any]
    default: int | float | bool | str | None
    help: str
    flag: str
    metavar: str | None = None
    #: Repeatable: each use converts to a ``(key, value)`` pair, the option is their dict.
    repeat: bool = False


def _tunables() -> tuple[Tunable, ...]:
    hints = typing.get_type_hints(Options.build, include_extras=True)
    tunables = []
    for param in inspect.signature(Options.build).parameters.values():
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            kind, help_text, *extra = typing.get_args(hints[param.name])
            if typing.get_origin(kind) in (typing.Union, types.UnionType):
                (kind,) = (arg for arg in typing.get_args(kind) if arg is not type(None))
            flag = next((e for e in extra if isinstance(e, Flag)), Flag("--" + param.name.replace("_", "-")))
            if flag.parse is not None:
                kind = flag.parse
            tunables.append(
                Tunable(param.name, kind, param.default, help_text, flag.flag, flag.metavar, flag.repeat)
            )
    return tuple(tunables)


#: The tunable options, with their types, defaults and help texts (CLI flags come from these).
TUNABLES = _tunables()


def _accepts(build: Callable[P, Options]) -> Callable[[Callable[[Options], R]], Callable[P, R]]:
    signature = inspect.signature(build)

    def decorate(body: Callable[[Options], R]) -> Callable[P, R]:
        @functools.wraps(body)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                signature.bind(*args, **kwargs)
            except TypeError as exc:
                # Name the public function, as Python does for its own arity errors.
                raise TypeError(f"{body.__name__}() {exc}") from None
            return body(build(*args, **kwargs))

        returns = inspect.signature(body).return_annotation
        call.__signature__ = signature.replace(return_annotation=returns)  # type: ignore[attr-defined]
        return call

    return decorate


#: Decorator: gives ``body(options)`` the parameters of :meth:`Options.build`, typed. The
#: result checks its arguments with ``Options.build`` and calls ``body`` with the options;
#: it keeps ``body``'s name and docstring and shows the options in ``help()``.
takes_options = _accepts(Options.build)
