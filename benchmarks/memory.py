"""Server memory per idle connection.

Starts a WarpSocket server in this process (echo worker, one worker thread), opens
N upgraded connections from a separate client process (asyncio, raw handshakes,
source addresses 127.0.0.1..8), waits until the server counts them all, and
prints how much the server's RSS grew per connection, and how much of the
C heap it uses per connection (glibc's ``mallinfo2``: allocations only, without
the allocator's free space, so steadier than RSS). The heap figure leaves out the
extension's over-aligned blocks (tokio's task and I/O registration of each connection,
256 bytes each), which mimalloc serves (crates/warpsocket-py/src/allocator.rs); the RSS
figure has everything.

    python benchmarks/memory.py [--connections 1000 10000] [--tls]

With ``--tls`` the server speaks TLS (an ECDSA P-256 certificate from a test CA made
with ``trustme``) and the clients connect over it, trusting that CA.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import warpsocket

ECHO = Path(__file__).resolve().parent.parent / "examples" / "echo" / "worker.py"

CLIENT = r"""
import asyncio, base64, os, resource, ssl, sys

hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
TLS = ssl.create_default_context(cafile=sys.argv[3]) if len(sys.argv) > 3 else None

async def one(port, i):
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(f"127.0.0.{1 + i % 8}", 0),
        ssl=TLS, server_hostname="localhost" if TLS else None,
    )
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    return reader, writer

async def main():
    port, n = int(sys.argv[1]), int(sys.argv[2])
    conns = []
    for start in range(0, n, 500):
        conns += await asyncio.gather(*(one(port, i) for i in range(start, min(n, start + 500))))
    print("connected", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def heap_bytes() -> int | None:
    """Bytes allocated with malloc (in arenas and mmapped), or None off glibc >= 2.33."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except AttributeError:
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def write_certs(folder: Path) -> tuple[str, str, str]:
    """A test CA and a localhost certificate it signed: (CA, chain, key) PEM paths."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    paths = folder / "ca.pem", folder / "chain.pem", folder / "key.pem"
    ca.cert_pem.write_to_path(str(paths[0]))
    paths[1].write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(paths[2]))
    return str(paths[0]), str(paths[1]), str(paths[2])


def measure(n: int, certs: tuple[str, str, str] | None) -> tuple[int, int, int | None]:
    tls = {"tls_cert": certs[1], "tls_key": certs[2]} if certs else {}
    with warpsocket.start("127.0.0.1:0", str(ECHO), threads=1, **tls) as server:
        time.sleep(0.5)
        before = rss_kib()
        heap_before = heap_bytes()
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(server.port), str(n), *(certs[:1] if certs else ())],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            if client.stdout is None or client.stdout.readline().strip() != "connected":
                raise RuntimeError("the client process failed to connect")
            deadline = time.monotonic() + 60
            while warpsocket.stats()["connections"] < n and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)
            heap_after = heap_bytes()
            heap = None if heap_before is None or heap_after is None else heap_after - heap_before
            return before, rss_kib(), heap
        finally:
            client.kill()
            client.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--tls", action="store_true", help="serve and connect over TLS")
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    folder = tempfile.TemporaryDirectory()
    certs = write_certs(Path(folder.name)) if args.tls else None
    for n in args.connections:
        before, after, heap = measure(n, certs)
        heap_text = "" if heap is None else f"; malloc heap {heap / n:,.0f} bytes per connection"
        print(
            f"{n:>7,} connections: server RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB, "
            f"{(after - before) * 1024 / n:,.0f} bytes per connection{heap_text}"
        )


if __name__ == "__main__":
    main()
