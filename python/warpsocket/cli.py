"""The ``warpsocket`` command: ``warpsocket WORKER --bind ADDR [options]`` runs ``run()``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ._core import DEFAULT_BIND
from .config import TUNABLES, default_threads
from .server import run


class _Collect(argparse.Action):
    """A repeatable flag whose uses give ``(key, value)`` pairs: the option is their dict."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        collected = dict(getattr(namespace, self.dest) or {})
        key, value = values
        collected[key] = value
        setattr(namespace, self.dest, collected)


class _Version(argparse.Action):
    """``--version``, looked up when asked for rather than when the parser is built.

    Reading the package's metadata costs every server ~2 MiB of memory.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        from . import __version__

        sys.stdout.write(f"{parser.prog} {__version__}\n")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser; every tunable of ``start()`` is a ``--flag``."""
    parser = argparse.ArgumentParser(
        prog="warpsocket",
        description="Run a WarpSocket server with the given worker module until SIGINT/SIGTERM.",
    )
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    parser.add_argument("worker", help="worker module: a .py file path or an importable module name")
    parser.add_argument(
        "--bind",
        action="append",
        metavar="ADDR",
        help=f"address to listen on, e.g. 127.0.0.1:3000 or [::1]:3000 (repeatable; default {DEFAULT_BIND})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"worker threads (default: max(cpu count, 4) = {default_threads()})",
    )
    parser.add_argument(
        "--worker-arg",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="JSON value passed to handle_start(worker_arg) in every worker",
    )
    parser.add_argument(
        "--static",
        dest="static_dir",
        metavar="DIR",
        default=None,
        help="serve the files of DIR to plain HTTP GET/HEAD requests on the same port",
    )
    parser.add_argument(
        "--cluster",
        metavar="URL",
        default=None,
        help="join the cluster of WarpSocket processes sharing this Redis server, "
        "e.g. redis://127.0.0.1:6379/0",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="PATH",
        default=None,
        help="PEM certificate chain (server certificate first): serve wss:// and https:// only; "
        "needs --tls-key",
    )
    parser.add_argument(
        "--tls-key", metavar="PATH", default=None, help="PEM private key of --tls-cert's certificate"
    )
    for tunable in TUNABLES:
        if tunable.type is bool:
            parser.add_argument(
                tunable.flag,
                action=argparse.BooleanOptionalAction,
                default=tunable.default,
                help=f"{tunable.help} (default: {'on' if tunable.default else 'off'})",
            )
            continue
        parser.add_argument(
            tunable.flag,
            dest=tunable.name,
            action=_Collect if tunable.repeat else "store",
            type=tunable.type,
            default=tunable.default,
            metavar=tunable.metavar,
            help=tunable.help if tunable.default is None else f"{tunable.help} (default: {tunable.default})",
        )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="level of the 'warpsocket' logger's output (default: INFO)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run the server until it is stopped."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    tunables = {tunable.name: getattr(args, tunable.name) for tunable in TUNABLES}
    try:
        run(
            bind=args.bind or [DEFAULT_BIND],
            worker=args.worker,
            threads=args.threads,
            worker_arg=args.worker_arg,
            static_dir=args.static_dir,
            cluster=args.cluster,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            **tunables,
        )
    except (OSError, ImportError, RuntimeError, ValueError, TypeError) as exc:
        logging.getLogger("warpsocket").error("%s", exc)
        sys.exit(1)
