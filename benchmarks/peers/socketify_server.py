"""The performance workload on socketify (uWebSockets), single process.

Uses socketify's native pub/sub: ``ws.subscribe(channel)`` and ``app.publish``
(which, unlike ``ws.publish``, includes the sender). With ``--tls-cert`` and
``--tls-key`` it serves wss:// (uWebSockets' SSLApp, OpenSSL). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json

from socketify import App, AppOptions, CompressOptions, OpCode

BUCKET_SIZE = 10
EVENT = {"type": "evt", "t": "This is a message to my dear clients"}

app: App
subscribed = 0


def ws_message(ws, message, opcode) -> None:
    global subscribed
    msg = json.loads(message)
    kind = msg.get("type")
    if kind == "req":
        app.publish(msg["channel"], json.dumps(EVENT), OpCode.TEXT)
        ws.send(json.dumps({"type": "ack"}), OpCode.TEXT)
    elif kind == "sub":
        channel = str(subscribed // BUCKET_SIZE)
        subscribed += 1
        ws.subscribe(channel)
        ws.send(json.dumps({"type": "sub-ack", "ch": channel}), OpCode.TEXT)


def make_app(cert: str | None, key: str | None) -> App:
    options = AppOptions(cert_file_name=cert, key_file_name=key) if cert and key else None
    made = App(options)
    made.ws(
        "/*",
        {
            "compression": CompressOptions.DISABLED,
            "max_payload_length": 16 * 1024 * 1024,
            # App.ws's default (64 KiB) makes publish skip a subscriber with more buffered,
            # which loses broadcasts under load; 16 MiB is WarpSocket's max_backpressure
            # and socketify's own CLI default.
            "max_backpressure": 16 * 1024 * 1024,
            "idle_timeout": 60,
            "message": ws_message,
        },
    )
    return made


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve wss://")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    args = parser.parse_args()
    app = make_app(args.tls_cert, args.tls_key)
    for port in args.port:
        app.listen(
            {"port": port, "host": args.host},
            lambda config: print(f"listening on {args.host}:{config.port}", flush=True),
        )
    app.run()
