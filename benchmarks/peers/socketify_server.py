"""The performance workload on socketify (uWebSockets), single process.

Uses socketify's native pub/sub: ``ws.subscribe(channel)`` and ``app.publish``
(which, unlike ``ws.publish``, includes the sender). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json

from socketify import App, CompressOptions, OpCode

BUCKET_SIZE = 10
EVENT = {"type": "evt", "t": "This is a message to my dear clients"}

app = App()
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


app.ws(
    "/*",
    {
        "compression": CompressOptions.DISABLED,
        "max_payload_length": 16 * 1024 * 1024,
        "idle_timeout": 60,
        "message": ws_message,
    },
)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, action="append", required=True)
    args = parser.parse_args()
    for port in args.port:
        app.listen(
            {"port": port, "host": args.host},
            lambda config: print(f"listening on {args.host}:{config.port}", flush=True),
        )
    app.run()
