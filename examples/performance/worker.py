"""The performance workload, written the way an application would write it.

Each client sends ``{"type": "sub"}`` once; the worker puts it in a channel shared
with at most 9 other clients of the same worker (buckets of 10) and answers
``{"type": "sub-ack", "ch": NAME}``. Every ``{"type": "req", "channel": NAME}`` then
broadcasts an event to that channel (10 recipients, the sender included) and answers
the sender with ``{"type": "ack"}``.

Run it with ``warpsocket examples/performance/worker.py --bind 127.0.0.1:3000`` and
drive it with the ``warpsocket-bench`` load generator (see docs/benchmarks.md).

Each worker thread runs its own copy of this module, so the bucket counter below is
per worker and needs no lock; the worker's thread id keeps channel names of different
workers apart.

With ``--worker-arg '{"buckets": "shared"}'`` the buckets are numbered by a counter in
the kv store instead, shared by every worker and, in cluster mode, by every node: the
channels then span workers and nodes (benchmarks/cluster.py uses it).
"""

from __future__ import annotations

import json
import threading

import warpsocket

BUCKET_SIZE = 10
EVENT = {"type": "evt", "t": "This is a message to my dear clients"}

SHARED_COUNTER = "performance:subscribed"

worker_name = ""
subscribed = 0  # sockets this worker has put into channels so far
shared_buckets = False


def handle_start(worker_arg: object) -> None:
    global worker_name, shared_buckets
    worker_name = str(threading.get_ident())
    shared_buckets = isinstance(worker_arg, dict) and worker_arg.get("buckets") == "shared"


def next_shared_slot() -> int:
    """Take the next number of the counter every worker and node shares (compare-and-set)."""
    while True:
        old = warpsocket.get_key(SHARED_COUNTER)
        slot = int(old or b"0")
        if warpsocket.set_key_if(SHARED_COUNTER, str(slot + 1), old):
            return slot


def handle_text_message(text: str, socket_id: int) -> None:
    global subscribed
    msg = json.loads(text)
    kind = msg.get("type")
    if kind == "req":
        warpsocket.send(msg["channel"], json.dumps(EVENT))
        warpsocket.send(socket_id, json.dumps({"type": "ack"}))
    elif kind == "sub":
        if shared_buckets:
            channel = f"shared-{next_shared_slot() // BUCKET_SIZE}"
        else:
            channel = f"{worker_name}-{subscribed // BUCKET_SIZE}"
            subscribed += 1
        warpsocket.subscribe(socket_id, channel)
        warpsocket.send(socket_id, json.dumps({"type": "sub-ack", "ch": channel}))
