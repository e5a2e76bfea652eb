"""Server options: one definition feeds ``start()``, ``run()`` and the CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

MiB = 1024 * 1024


def default_threads() -> int:
    """Worker threads when none are asked for: one per CPU, at least 4."""
    return max(os.cpu_count() or 1, 4)


@dataclass(frozen=True)
class Options:
    """Validated server options (API.md §1)."""

    bind: tuple[str, ...]
    worker: str
    threads: int = field(default_factory=default_threads)
    worker_arg: Any = None
    static_dir: str | None = None
    cluster: str | None = None
    handler_timeout: float = field(default=5.0, metadata={"help": "seconds an async handler may run"})
    hang_timeout: float = field(
        default=3.0, metadata={"help": "seconds a worker may leave its events waiting"}
    )
    max_message_size: int = field(
        default=16 * MiB, metadata={"help": "largest incoming message in bytes (else 1009)"}
    )
    max_backpressure: int = field(
        default=16 * MiB,
        metadata={"help": "queued outgoing bytes per connection before closing with 1008"},
    )
    ping_interval: float = field(default=20.0, metadata={"help": "seconds between keepalive pings"})
    ping_timeout: float = field(
        default=20.0, metadata={"help": "seconds to wait for a keepalive answer (else 1011)"}
    )
    max_pending_upgrades: int = field(
        default=1024,
        metadata={"help": "connections allowed in their handshake at once; more are dropped"},
    )

    @classmethod
    def build(
        cls,
        bind: str | list[str] | tuple[str, ...],
        worker: str | os.PathLike[str],
        threads: int | None = None,
        worker_arg: Any = None,
        static_dir: str | os.PathLike[str] | None = None,
        cluster: str | None = None,
        **tunables: Any,
    ) -> Options:
        """Check every argument and return the options, raising TypeError/ValueError."""
        if isinstance(bind, str):
            binds: tuple[str, ...] = (bind,)
        elif isinstance(bind, (list, tuple)) and all(isinstance(b, str) for b in bind):
            binds = tuple(bind)
        else:
            raise TypeError("bind must be an address string or a list of them")
        if not binds:
            raise ValueError("bind must name at least one address")
        if isinstance(worker, os.PathLike):
            worker = os.fspath(worker)
        if not isinstance(worker, str):
            raise TypeError("worker must be a file path or a module name (str)")
        if not worker:
            raise ValueError("worker must not be empty")
        if static_dir is not None:
            if isinstance(static_dir, os.PathLike):
                static_dir = os.fspath(static_dir)
            if not isinstance(static_dir, str):
                raise TypeError("static_dir must be a folder path (str) or None")
            if not os.path.isdir(static_dir):
                raise ValueError(f"static_dir {static_dir!r} is not an existing folder")
            static_dir = os.path.abspath(static_dir)
        if cluster is not None:
            if not isinstance(cluster, str):
                raise TypeError(f"cluster must be a Redis URL (str) or None, not {type(cluster).__name__}")
            if not cluster.startswith(("redis://", "unix://", "redis+unix://")):
                raise ValueError(f"cluster must be a redis:// URL, got {cluster!r}")
        if threads is None:
            threads = default_threads()
        _check_int("threads", threads)
        unknown = set(tunables) - {f.name for f in TUNABLES}
        if unknown:
            raise TypeError(f"unexpected keyword argument {sorted(unknown)[0]!r}")
        for spec in TUNABLES:
            if spec.name in tunables:
                value = tunables[spec.name]
                if spec.type == "int":
                    _check_int(spec.name, value)
                else:
                    _check_seconds(spec.name, value)
                    tunables[spec.name] = float(value)
        return cls(
            bind=binds,
            worker=worker,
            threads=threads,
            worker_arg=worker_arg,
            static_dir=static_dir,
            cluster=cluster,
            **tunables,
        )


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _check_seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


#: The tunable options, with their defaults and help texts (CLI flags come from these).
TUNABLES = tuple(f for f in fields(Options) if "help" in f.metadata)
