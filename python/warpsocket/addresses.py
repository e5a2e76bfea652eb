"""``host:port`` addresses: parsing ``metrics_bind`` and showing bound addresses."""

from __future__ import annotations


def parse_bind(bind: str) -> tuple[str, int]:
    """Split ``"host:port"`` or ``"[v6]:port"`` into host and port; ``ValueError`` if malformed."""
    if not isinstance(bind, str):
        raise TypeError(f"metrics_bind must be a str like '127.0.0.1:9100', not {type(bind).__name__}")
    host, sep, port = bind.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address needs brackets: "[::1]:9100"
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"metrics_bind must look like '127.0.0.1:9100' or '[::1]:9100', got {bind!r}")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (``[::1]:3000``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
