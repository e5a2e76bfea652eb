"""Soak: connections churning against a real server, with exact delivery checks.

Starts benchmarks/soak_server.py (``warpsocket.start`` with benchmarks/soak_worker.py,
a small ``max_backpressure`` and short keepalive timers, and a publisher thread that
numbers every channel's broadcasts) in a subprocess, and keeps ``--clients`` asyncio
clients (the ``websockets`` package) churning against it for ``--duration`` seconds.
Each client runs one scenario, then starts again as a new connection:

- normal: subscribe to 1-3 channels, directly and through virtual sockets with
  prefixes, track itself in 1-3 presence channels (``room0``, ...; the connection and
  some of its virtual sockets, as a member of its own), do kv compare-and-set
  increments, read for a while, untrack some of its sockets, unsubscribe / delete the
  virtual sockets (which untracks them), close (which untracks the rest);
- vanish: subscribe, track itself, read a little, then drop the TCP connection without a close
  frame, either with an RST (SO_LINGER 0) or a plain abort;
- bye: subscribe, track itself, then ask the server to close the connection (4000);
- slow: a small receive buffer, a subscription, then the worker floods the socket
  while the client does not read: it must be closed with 1008 (backpressure limit);
- zombie: stop reading entirely (pings go unanswered): closed with 1011.

Besides these, ``--recoverers`` clients each follow 1-3 history channels (``hist0``, ...,
``History(--history-size)``, and ``tiny0``, ``History(--tiny-size)``) across connection
after connection: connect, ask the worker to ``recover`` each channel (directly or through
a new prefixed virtual socket) from the last offset they saw (the first time from
``position()``), read the stamped deliveries for a while, drop the connection (a clean
close, an abort or an RST; sometimes before the recover answers came), wait a random
disconnect window and start again. ``tiny0`` keeps fewer messages than a window lasts,
so its recovers are often ``False``; the ``hist`` channels keep more than any window.

Checks, each a violation that makes the run fail (exit status 1):

- per client and stream (a channel subscribed directly, or through one virtual socket):
  the broadcast numbers received are consecutive (nothing lost, duplicated or
  reordered); the first is at most K+1 and, after an unsubscribe, the last at least
  M-1, K and M being the publisher's numbers the worker read after subscribing and
  before unsubscribing (soak_worker.py): so no message is lost at either end either;
- close codes: 4000 for bye, 1008 for slow readers (or a dropped TCP connection when the
  close frame could not be written; ``backpressure_closes`` counts exactly those), 1011 or
  a dropped TCP connection for zombies, no other close (a keepalive 1011 for a client that
  answers pings means its event loop starved for ``ping_timeout``: see the loop lag);
- handle_open and handle_close exactly once per connection (checked by the worker
  with kv keys per socket), and both counts equal to the connections the clients made;
- compare-and-set: every increment a client was told about is a distinct value, and
  the shared counter equals the increments the workers made;
- presence: every ``track``/``untrack`` answer matches the client's model (joined only
  for the member's first tracked socket in the channel, left only for its last); the
  worker's ``handle_presence`` sees each member's changes alternate (a join while
  present, or a leave while absent, is a violation: see soak_worker.py); at the end the
  joins and the leaves reported both equal the joins the clients' model expects, and
  ``presence_count`` of every presence channel and ``stats()["presence_members"]`` are 0;
- per recovering client and history channel, across all its connections: the offsets
  received are consecutive (a gap or a duplicate is a violation, and counted) and the
  number in each message equals its stamp; ``recover`` returned what it must (``True``
  exactly when the offset given was from the current epoch and at most ``size`` behind
  the channel's last offset when recover ran, which the worker brackets with
  ``position()`` before and after); after ``True`` the first delivery is the offset given
  plus one, after ``False`` (counted, then the client re-bases) it is the last offset at
  the time of the call plus one;
- afterwards: no connection, virtual socket, channel, subscription or per-socket key
  left, and the server's threads and open fds back to what they were before the load;
- the growth of the server's RSS and C heap (glibc mallinfo2) after the warm-up, as a
  least-squares slope, below ``--max-growth`` MB per hour.

    python benchmarks/soak.py [--duration 600] [--clients 96] [--channels 8] [--rate 20]
                              [--recoverers 16] [--history-channels 2] [--history-size 1000]
                              [--tiny-size 16]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import itertools
import json
import random
import resource
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

SERVER = Path(__file__).resolve().parent / "soak_server.py"
MB = 1_000_000
# Violations listed in full; beyond these only counted.
MAX_LISTED = 50


@dataclass(frozen=True)
class Settings:
    """What a soak run does; the defaults are the 10-minute benchmark's."""

    duration: float = 600.0
    clients: int = 96
    channels: int = 8
    rate: float = 20.0  # broadcasts per second on each channel
    threads: int = 4
    max_backpressure: int = 64 * 1024
    ping_interval: float = 2.0
    # Generous: a client whose event loop the machine starves for this long is dropped (1011).
    ping_timeout: float = 10.0
    sample_every: float = 5.0
    warmup: float = 120.0  # seconds left out of the growth slopes
    max_growth: float = 20 * MB  # bytes per hour, for RSS and for the C heap
    seed: int = 1
    recoverers: int = 16  # clients that disconnect and recover history channels
    history_channels: int = 2  # hist0, hist1, ... (besides tiny0)
    # 50 s of messages at 20/s: far more than a disconnect window (at most ~3 s).
    history_size: int = 1000
    # 0.8 s of messages at 20/s: windows are often longer, so recover says False.
    tiny_size: int = 16
    max_window: float = 2.0  # the longest pause between two connections of a recovering client
    presence_channels: int = 3  # room0, room1, ...: where normal, vanish and bye clients track themselves


@dataclass
class Report:
    """What a soak run saw; ``violations`` empty means it passed."""

    settings: Settings
    elapsed: float = 0.0
    connections: int = 0
    messages_checked: int = 0
    cas_checked: int = 0
    flood_messages: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    scenarios: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    rss_per_hour: float | None = None
    client_cpu: float = 0.0  # CPU seconds of this process (the clients)
    loop_lag: float = 0.0  # the longest the clients' event loop was late (a starved process)
    server_cpu: float = 0.0  # ... and of the server process
    heap_per_hour: float | None = None
    recovers: Counter[str] = field(default_factory=Counter)  # "True", "False", "False on hist*"
    drops: Counter[str] = field(default_factory=Counter)  # how recovering clients disconnected
    recovers_interrupted: int = 0  # connections dropped before a recover's answer came
    history_checked: int = 0  # stamped deliveries checked in offset sequence
    history_replayed: int = 0  # ... of which recover replayed (offset <= position before it)
    gaps: int = 0  # offsets missing in a recovering client's sequence
    duplicates: int = 0  # offsets it received twice (or out of order)
    tracks: int = 0  # track calls (connections and virtual sockets)
    untracks: int = 0  # untrack calls
    presence_joins: int = 0  # joins the clients' model expects (each also leaves by the end)

    def violation(self, text: str) -> None:
        """Record one violation (the first ``MAX_LISTED`` are kept in full)."""
        self.violation_count += 1
        if len(self.violations) < MAX_LISTED:
            self.violations.append(text)

    @property
    def ok(self) -> bool:
        """True when the run found no violation."""
        return self.violation_count == 0

    def summary(self) -> str:
        """The figures and the verdict, as printed by ``main``."""
        s = self.settings
        faults = ", ".join(f"{name} {count}" for name, count in sorted(self.faults.items()))
        lines = [
            f"soak: {self.elapsed:.0f} s, {s.clients} concurrent clients, {s.channels} channels x "
            f"{s.rate:g}/s, {s.threads} worker threads, max_backpressure {s.max_backpressure}",
            f"connections churned: {self.connections:,} ({self.connections / max(self.elapsed, 1):.1f}/s)",
            f"messages checked: {self.messages_checked:,} broadcasts in sequence, "
            f"{self.cas_checked:,} compare-and-set results, {self.flood_messages:,} flood messages",
            f"faults injected: {sum(self.faults.values()):,} ({faults})",
            f"history: {s.recoverers} recovering clients dropped {self.drops['close']:,} times with a "
            f"clean close, {self.drops['abort']:,} aborts, {self.drops['rst']:,} RSTs; "
            f"recovers True {self.recovers['True']:,}, False {self.recovers['False']:,} "
            f"({self.recovers['False on hist']:,} on hist*, size {s.history_size}; the rest on tiny0, "
            f"size {s.tiny_size}), {self.recovers_interrupted:,} dropped before the answer",
            f"history: {self.history_checked:,} stamped messages checked in offset sequence "
            f"({self.history_replayed:,} replayed), gaps {self.gaps}, duplicates {self.duplicates}",
            f"presence: {self.tracks:,} tracks and {self.untracks:,} untracks in {s.presence_channels} "
            f"channels, {self.presence_joins:,} joins expected; handle_presence reported "
            f"{self.after.get('joins', 0):,} joins and {self.after.get('leaves', 0):,} leaves",
            f"CPU: clients {self.client_cpu / max(self.elapsed, 1):.0%} of a core, "
            f"server {self.server_cpu / max(self.elapsed, 1):.0%}; "
            f"clients' event loop late by up to {self.loop_lag:.2f} s",
            f"server threads {self.before.get('threads')} -> {self.after.get('threads')}, "
            f"open fds {self.before.get('fds')} -> {self.after.get('fds')}",
            f"growth after {s.warmup:g} s warm-up: RSS {_per_hour(self.rss_per_hour)}, "
            f"C heap {_per_hour(self.heap_per_hour)} "
            f"(limit {s.max_growth / MB:g} MB/h; RSS {_mb(self.before.get('rss'))} -> "
            f"{_mb(self.after.get('rss'))}, heap {_mb(self.before.get('heap'))} -> "
            f"{_mb(self.after.get('heap'))})",
        ]
        if self.ok:
            lines.append("verdict: PASS")
        else:
            lines.append(f"verdict: FAIL, {self.violation_count} violation(s):")
            lines += [f"  - {text}" for text in self.violations]
            if self.violation_count > len(self.violations):
                lines.append(f"  ... and {self.violation_count - len(self.violations)} more")
        return "\n".join(lines)


def _per_hour(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MB:+.2f} MB/h"


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MB:.1f} MB"


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(seconds, bytes)`` points, in bytes per hour."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 3600


class Stream:
    """The broadcasts of one channel as one subscription entry of one client receives them."""

    def __init__(self, name: str, channel: str) -> None:
        self.name = name
        self.channel = channel
        self.first: int | None = None
        self.last: int | None = None
        self.floor: int | None = None  # publisher's number read after subscribing
        self.ceiling: int | None = None  # ... and before unsubscribing

    def receive(self, seq: int, report: Report) -> None:
        if self.last is not None and seq != self.last + 1:
            kind = "lost" if seq > self.last + 1 else "duplicated or reordered"
            report.violation(f"{self.name}: broadcast {seq} after {self.last} ({kind})")
        if self.first is None:
            self.first = seq
        self.last = seq
        report.messages_checked += 1

    def settle(self, report: Report) -> None:
        """Check the ends of the stream once the client is done with it."""
        if self.floor is None:
            return
        if self.first is not None and self.first > self.floor + 1:
            report.violation(
                f"{self.name}: first broadcast {self.first}, but {self.floor + 1} was sent after subscribing"
            )
        if self.ceiling is not None and self.floor + 1 <= self.ceiling - 1:
            if self.last is None or self.last < self.ceiling - 1:
                report.violation(
                    f"{self.name}: last broadcast {self.last}, but {self.ceiling - 1} was queued "
                    "before unsubscribing"
                )


class Unexpected(Exception):
    """A client saw something the server must not do."""


class Client:
    """One connection running one scenario; every message it reads is checked."""

    prefixes = itertools.count(1)
    members = itertools.count(1)

    def __init__(self, soak: Soak, ws: ClientConnection, label: str) -> None:
        self.soak = soak
        self.report = soak.report
        self.ws = ws
        self.label = label
        self.streams: dict[str, Stream] = {}
        # Presence: this connection's member, and per channel the sockets tracked there
        # ("" for the connection, a virtual socket's prefix for it).
        self.member = f"u{next(self.members)}"
        self.tracked: dict[str, set[str]] = {}
        self.opened = time.monotonic()
        self.doing = "opening"  # for the report when something unexpected happens

    def where(self) -> str:
        """How long the connection has been open and what it was doing, for a violation."""
        return f"{time.monotonic() - self.opened:.1f} s after opening, {self.doing}"

    def take(self, message: str | bytes) -> str | None:
        """Check a broadcast; return an answer of the worker (``!...``) for the caller."""
        if isinstance(message, bytes):
            self.report.flood_messages += 1
            return None
        if message.startswith("!"):
            return message
        head, _, rest = message.partition(" ")
        prefix, bar, channel = head.rpartition("|")
        key = prefix if bar else channel
        stream = self.streams.get(key)
        if stream is None or stream.channel != channel:
            self.report.violation(f"{self.label}: broadcast {message[:40]!r} for no subscription of it")
            return None
        stream.receive(int(rest.split(" ", 1)[0]), self.report)
        return None

    async def answer(self, command: str) -> list[str]:
        """Send a command and read (checking broadcasts) until the worker answers it."""
        self.doing = f"waiting for the answer to {command!r} sent at {time.monotonic() - self.opened:.1f} s"
        await self.ws.send(command)
        while True:
            reply = self.take(await asyncio.wait_for(self.ws.recv(), 30))
            if reply is not None:
                words = reply[1:].split(" ")
                if words[0] != command.split(" ", 1)[0]:
                    raise Unexpected(f"answer {reply!r} to {command!r}")
                return words[1:]

    async def read_for(self, seconds: float) -> None:
        """Read and check broadcasts for ``seconds``."""
        self.doing = f"reading for {seconds:.1f} s from {time.monotonic() - self.opened:.1f} s"
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(self.ws.recv(), left)
            except asyncio.TimeoutError:
                return
            if self.take(message) is not None:
                raise Unexpected(f"unasked answer {message!r}")

    async def read_until_closed(self, seconds: float) -> int | None:
        """Read and check everything until the server closes; return its close code or None."""

        async def drain() -> int | None:
            try:
                while True:
                    self.take(await self.ws.recv())
            except ConnectionClosed as closed:
                return None if closed.rcvd is None else closed.rcvd.code

        try:
            return await asyncio.wait_for(drain(), seconds)
        except asyncio.TimeoutError:
            raise Unexpected(f"not closed by the server within {seconds:g} s") from None

    async def subscribe_some(self, rng: random.Random) -> None:
        channels = rng.sample(range(self.soak.settings.channels), rng.randint(1, 3))
        for index in channels:
            channel = f"ch{index}"
            if rng.random() < 0.6:
                self.streams[channel] = Stream(f"{self.label} {channel}", channel)
                (_, floor) = await self.answer(f"sub {channel}")
                self.streams[channel].floor = int(floor)
            if rng.random() < 0.5:
                prefix = f"p{next(self.prefixes)}"
                self.streams[prefix] = Stream(f"{self.label} {prefix}|{channel}", channel)
                (_, floor) = await self.answer(f"vsub {channel} {prefix}|")
                self.streams[prefix].floor = int(floor)

    async def unsubscribe_all(self) -> None:
        for key, stream in self.streams.items():
            if key == stream.channel:
                (_, ceiling) = await self.answer(f"unsub {key}")
            else:
                (_, ceiling) = await self.answer(f"vdel {key}|")
            stream.ceiling = int(ceiling)

    def settle(self) -> None:
        for stream in self.streams.values():
            stream.settle(self.report)

    async def track_some(self, rng: random.Random) -> None:
        """Track this connection, and maybe its virtual sockets, in 1-3 presence channels.

        The member is this connection's own, so each of its changes is decided on one
        worker (see soak_worker.handle_presence); a virtual socket tracked as the same member
        is a second tab: no change. Each answer is checked against the model.
        """
        rooms = self.soak.settings.presence_channels
        prefixes = [key for key, stream in self.streams.items() if key != stream.channel]
        for index in rng.sample(range(rooms), rng.randint(1, min(3, rooms))):
            room = f"room{index}"
            for key in ["", *(p for p in prefixes if rng.random() < 0.5)]:
                await self.track(room, key)

    async def track(self, room: str, key: str) -> None:
        holders = self.tracked.setdefault(room, set())
        route = f" {key}|" if key else ""
        (_, joined) = await self.answer(f"track {room} {self.member}{route}")
        expected = not holders
        if joined != str(int(expected)):
            self.report.violation(f"{self.label}: track in {room} ({key or 'connection'}) said {joined}")
        holders.add(key)
        self.report.tracks += 1
        self.report.presence_joins += expected

    async def untrack_some(self, rng: random.Random) -> None:
        """Untrack some of the tracked sockets; the rest leave with their close or vdel."""
        for room, holders in self.tracked.items():
            for key in sorted(holders):
                if rng.random() < 0.5:
                    route = f" {key}|" if key else ""
                    (_, left) = await self.answer(f"untrack {room}{route}")
                    holders.discard(key)
                    if left != str(int(not holders)):
                        where = key or "connection"
                        self.report.violation(f"{self.label}: untrack in {room} ({where}) said {left}")
                    self.report.untracks += 1


class HistoryStream:
    """One recovering client's view of one history channel, across all its connections."""

    def __init__(self, name: str, channel: str, size: int) -> None:
        self.name = name
        self.channel = channel
        self.size = size
        self.epoch: str | None = None  # None until a recover answered
        self.last: int | None = None  # offset of the last message seen (None: re-basing)
        # After a False recover: the offsets the first live delivery may have.
        self.rebase: tuple[int, int] | None = None
        # While a recover's answer has not come: the deliveries of this connection so far.
        self.pending: list[int] | None = None

    def since(self) -> str:
        """The ``rec`` command's epoch and offset: where this client is."""
        if self.epoch is None:
            return "- -"
        assert self.last is not None
        return f"{self.epoch} {self.last}"

    def deliver(self, offset: int, seq: int, report: Report) -> None:
        """Check a stamped delivery (``seq``: the number the publisher put in the data)."""
        if seq != offset:
            report.violation(f"{self.name}: message {seq} stamped with offset {offset}")
        if self.pending is None:
            self.sequence(offset, report)
        else:
            self.pending.append(offset)

    def sequence(self, offset: int, report: Report) -> None:
        """Check that ``offset`` comes next in this client's sequence."""
        report.history_checked += 1
        if self.last is None:
            if self.rebase is None:
                report.violation(f"{self.name}: offset {offset} before any recover answered")
            else:
                low, high = self.rebase
                if offset > high:
                    report.gaps += offset - high
                    report.violation(
                        f"{self.name}: first offset {offset} after a False recover, at most {high} expected"
                    )
                elif offset < low:  # a replay, which False must not do: duplicates for the client
                    report.duplicates += 1
                    report.violation(
                        f"{self.name}: first offset {offset} after a False recover, at least {low} expected"
                    )
            self.rebase = None
        elif offset > self.last + 1:
            report.gaps += offset - self.last - 1
            report.violation(f"{self.name}: offset {offset} after {self.last} (gap)")
        elif offset <= self.last:
            report.duplicates += 1
            report.violation(f"{self.name}: offset {offset} after {self.last} (duplicate or reordered)")
        self.last = offset

    def answered(self, words: list[str], report: Report) -> None:
        """Check a ``!rec`` answer, then the deliveries kept aside for it."""
        recovered, since = words[0] == "1", int(words[1])
        epoch, before, epoch_after, after = words[2], int(words[3]), words[4], int(words[5])
        pending, self.pending = self.pending, None
        if pending is None:
            report.violation(f"{self.name}: a recover answer nobody asked for: {words}")
            return
        if epoch_after != epoch:
            report.violation(f"{self.name}: epoch {epoch} became {epoch_after} during a recover")
        if self.epoch is not None and self.epoch != epoch:
            # One process, a publisher that never pauses for the ttl: the sequence never restarts.
            report.violation(f"{self.name}: epoch {self.epoch} became {epoch}")
        if self.epoch is not None and since != self.last:
            report.violation(f"{self.name}: recovered from {since}, but the client sent {self.last}")
        same = self.epoch is None or self.epoch == epoch
        # The channel's last offset when recover held its lock is in [before, after]; True
        # means since+1 ... that offset were all kept, i.e. since >= last - size.
        must = same and after - self.size <= since <= before
        must_not = not same or since < before - self.size or since > after
        if recovered and must_not or not recovered and must:
            report.violation(
                f"{self.name}: recover from {since} returned {recovered} with the channel at "
                f"{before}..{after}, size {self.size}"
            )
        report.recovers[str(recovered)] += 1
        if not recovered and self.channel.startswith("hist"):
            report.recovers["False on hist"] += 1
        self.epoch = epoch
        if recovered:
            self.last, self.rebase = since, None
        else:
            self.last, self.rebase = None, (before + 1, after + 1)
        report.history_replayed += sum(offset <= before for offset in pending)
        for offset in pending:
            self.sequence(offset, report)

    def disconnected(self) -> None:
        """The connection is gone: forget an unanswered recover, settle a re-base."""
        self.pending = None
        if self.last is None and self.rebase is not None:
            # False, then no delivery: resume from the last offset before that recover
            # (what a client re-based from ``position()`` would know).
            self.last, self.rebase = self.rebase[0] - 1, None


class Recoverer:
    """A client that follows history channels across connections."""

    def __init__(self, index: int, streams: list[HistoryStream]) -> None:
        self.index = index
        self.streams = {stream.channel: stream for stream in streams}


# Newer websockets read proxies from the environment; the soak talks to loopback only.
_NO_PROXY: dict[str, Any] = {"proxy": None} if "proxy" in inspect.signature(connect).parameters else {}


class Soak:
    """One soak run: the server process, the client pool, the samples and the final checks."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.report = Report(settings)
        self.rng = random.Random(settings.seed)
        self.cas_values: list[int] = []
        self.clients: dict[str, Client] = {}  # by label, while their scenario runs
        self.port = 0
        self.deadline = 0.0
        self.process: asyncio.subprocess.Process | None = None
        self.scenarios: list[tuple[str, Callable[[str], Awaitable[None]], int]] = [
            ("normal", self.normal, 45),
            ("vanish (RST)", self.vanish_rst, 12),
            ("vanish (abort)", self.vanish_abort, 12),
            ("bye", self.bye, 12),
            ("slow reader (1008)", self.slow, 9),
            ("zombie (1011)", self.zombie, 4),
        ]

    # -- the server process ---------------------------------------------------

    async def ask(self, command: str) -> dict[str, Any]:
        """Send a command to the server process and return its JSON answer."""
        assert self.process is not None and self.process.stdin and self.process.stdout
        self.process.stdin.write(f"{command}\n".encode())
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), 60)
        if not line:
            raise RuntimeError(f"the soak server exited (status {await self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def run(self) -> Report:
        """Start the server, churn clients until the deadline, then check everything."""
        s = self.settings
        own_cpu, children_cpu = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SERVER),
            f"--threads={s.threads}",
            f"--channels={s.channels}",
            f"--rate={s.rate}",
            f"--max-backpressure={s.max_backpressure}",
            f"--ping-interval={s.ping_interval}",
            f"--ping-timeout={s.ping_timeout}",
            f"--history-channels={s.history_channels}",
            f"--history-size={s.history_size}",
            f"--tiny-size={s.tiny_size}",
            f"--presence-channels={s.presence_channels}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert self.process.stdout is not None
            line = await asyncio.wait_for(self.process.stdout.readline(), 120)
            if not line:
                raise RuntimeError("the soak server did not start (see its stderr above)")
            self.port = json.loads(line)["port"]
            self.report.before = await self.ask("sample")
            start = time.monotonic()
            self.deadline = start + s.duration
            background = [asyncio.create_task(self.sample()), asyncio.create_task(self.watch_loop())]
            try:
                await asyncio.gather(
                    *(self.client_loop(i) for i in range(s.clients)),
                    *(self.recoverer_loop(i) for i in range(s.recoverers)),
                )
            finally:
                for task in background:
                    task.cancel()
            self.report.elapsed = time.monotonic() - start
            await self.check_after()
            await self.ask("stop")
            status = await asyncio.wait_for(self.process.wait(), 60)
            self.report.server_cpu = _cpu(resource.RUSAGE_CHILDREN) - children_cpu
            self.report.client_cpu = _cpu(resource.RUSAGE_SELF) - own_cpu
            if status != 0:
                self.report.violation(f"the server process exited with status {status}")
        finally:
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        return self.report

    async def sample(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sample_every)
            self.report.samples.append(await self.ask("sample"))

    async def watch_loop(self) -> None:
        """Record how late the event loop wakes up: how starved the clients are."""
        while True:
            start = time.monotonic()
            await asyncio.sleep(0.1)
            self.report.loop_lag = max(self.report.loop_lag, time.monotonic() - start - 0.1)

    # -- clients ----------------------------------------------------------------

    async def client_loop(self, index: int) -> None:
        names = [name for name, _, _ in self.scenarios]
        weights = [weight for _, _, weight in self.scenarios]
        runs = {name: scenario for name, scenario, _ in self.scenarios}
        for round_ in itertools.count():
            if time.monotonic() >= self.deadline:
                return
            name = self.rng.choices(names, weights)[0]
            label = f"client {index}.{round_} ({name})"
            self.report.scenarios[name] += 1
            try:
                await runs[name](label)
            except Exception as exc:  # anything a scenario did not expect is a finding
                client = self.clients.get(label)
                where = "" if client is None else f" ({client.where()})"
                self.report.violation(f"{label}: {type(exc).__name__}: {exc}{where}")
            finally:
                self.clients.pop(label, None)

    async def open(self, label: str, sock: socket.socket | None = None, **kwargs: Any) -> Client | None:
        try:
            ws = await connect(
                f"ws://127.0.0.1:{self.port}/",
                sock=sock,
                open_timeout=30,
                close_timeout=10,
                ping_interval=None,
                compression=None,
                max_size=None,
                **_NO_PROXY,
                **kwargs,
            )
        except Exception as exc:  # the server accepts every upgrade
            if sock is not None:
                sock.close()
            self.report.violation(f"{label}: handshake failed: {type(exc).__name__}: {exc}")
            return None
        self.report.connections += 1
        client = self.clients[label] = Client(self, ws, label)
        return client

    async def normal(self, label: str) -> None:
        client = await self.open(label)
        if client is None:
            return
        try:
            await client.subscribe_some(self.rng)
            await client.track_some(self.rng)
            for _ in range(self.rng.randint(0, 2)):
                (value,) = await client.answer("cas")
                self.cas_values.append(int(value))
                self.report.cas_checked += 1
            await client.read_for(self.rng.uniform(0.3, 2.5))
            await client.untrack_some(self.rng)
            await client.unsubscribe_all()
            await client.ws.close()
            rcvd = client.ws.protocol.close_rcvd
            if rcvd is None or rcvd.code != 1000:
                self.report.violation(f"{label}: the server answered a 1000 close with {rcvd}")
        finally:
            client.ws.transport.abort()
        client.settle()

    async def vanish(self, label: str, rst: bool) -> None:
        client = await self.open(label)
        if client is None:
            return
        try:
            await client.subscribe_some(self.rng)
            await client.track_some(self.rng)  # left by the server when the connection drops
            await client.read_for(self.rng.uniform(0.1, 1.5))
            if rst:
                sock = client.ws.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            client.ws.transport.abort()
        self.report.faults["vanish (RST)" if rst else "vanish (abort)"] += 1
        client.settle()

    async def vanish_rst(self, label: str) -> None:
        await self.vanish(label, rst=True)

    async def vanish_abort(self, label: str) -> None:
        await self.vanish(label, rst=False)

    async def bye(self, label: str) -> None:
        client = await self.open(label)
        if client is None:
            return
        try:
            await client.subscribe_some(self.rng)
            await client.track_some(self.rng)
            await client.read_for(self.rng.uniform(0.1, 1.0))
            await client.ws.send("bye")
            code = await client.read_until_closed(30)
        finally:
            client.ws.transport.abort()
        if code != 4000:
            self.report.violation(f"{label}: closed with {code} instead of 4000")
        client.settle()

    async def slow(self, label: str) -> None:
        # A small receive buffer and message queue: the flood backs up into the server fast.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port)), 30
            )
        except Exception:
            sock.close()
            raise
        client = await self.open(label, sock=sock, max_queue=4)
        if client is None:
            return
        try:
            await client.subscribe_some(self.rng)
            await client.ws.send("flood")
            await asyncio.sleep(1.0)  # not reading
            code = await client.read_until_closed(30)
        finally:
            client.ws.transport.abort()
        self.report.faults["slow reader (1008)"] += 1
        # None: the connection was dropped before its close frame could be written (the
        # client's buffer was full); backpressure_closes still has to count it.
        if code not in (1008, None):
            self.report.violation(f"{label}: a slow reader was closed with {code} instead of 1008")
        client.settle()

    async def zombie(self, label: str) -> None:
        client = await self.open(label)
        if client is None:
            return
        try:
            client.ws.transport.pause_reading()
            await asyncio.sleep(self.settings.ping_interval + self.settings.ping_timeout + 2)
            client.ws.transport.resume_reading()
            code = await client.read_until_closed(30)
        finally:
            client.ws.transport.abort()
        self.report.faults["zombie (1011)"] += 1
        if code not in (1011, None):  # None: the server dropped the TCP connection
            self.report.violation(f"{label}: a client not answering pings was closed with {code}")

    # -- recovering clients -------------------------------------------------------

    def recoverer(self, index: int) -> Recoverer:
        s = self.settings
        sized = [f"hist{i}" for i in range(s.history_channels)]
        channels = self.rng.sample(sized, self.rng.randint(min(1, len(sized)), min(2, len(sized))))
        # Every other client also follows tiny0, so that both recover results come up.
        if index % 2 == 0 or not channels:
            channels.append("tiny0")
        return Recoverer(
            index,
            [
                HistoryStream(
                    f"recoverer {index} {channel}",
                    channel,
                    s.history_size if channel.startswith("hist") else s.tiny_size,
                )
                for channel in channels
            ],
        )

    async def recoverer_loop(self, index: int) -> None:
        who = self.recoverer(index)
        for round_ in itertools.count():
            if time.monotonic() >= self.deadline:
                return
            label = f"recoverer {index}.{round_}"
            try:
                await self.recover_once(who, label)
            except Exception as exc:  # anything unexpected is a finding
                client = self.clients.get(label)
                where = "" if client is None else f" ({client.where()})"
                self.report.violation(f"{label}: {type(exc).__name__}: {exc}{where}")
            finally:
                self.clients.pop(label, None)
                for stream in who.streams.values():
                    if stream.pending is not None:
                        self.report.recovers_interrupted += 1
                    stream.disconnected()
            # The disconnect window: the channels go on without this client.
            window = self.rng.uniform(0, self.settings.max_window)
            await asyncio.sleep(min(window, max(self.deadline - time.monotonic(), 0)))

    def take_history(self, who: Recoverer, routes: dict[str, HistoryStream], message: str | bytes) -> None:
        """Check one message a recovering client got: a ``!rec`` answer or a stamped delivery."""
        if isinstance(message, bytes):
            raise Unexpected(f"binary message {message[:20]!r}")
        if message.startswith("!rec "):
            channel, *words = message[5:].split(" ")
            stream = who.streams.get(channel)
            if stream is None:
                raise Unexpected(f"answer {message!r} for a channel not asked for")
            stream.answered(words, self.report)
            return
        # "<prefix>|<offset>:<channel> <seq> ..." or "<offset>:<channel> <seq> ..."
        key, bar, rest = message.partition("|")
        if not bar:
            rest = message
        stamp, colon, data = rest.partition(":")
        channel, _, tail = data.partition(" ")
        if not (colon and stamp.isdigit()):
            raise Unexpected(f"unstamped message {message[:60]!r}")
        stream = routes.get(key if bar else channel)
        if stream is None or stream.channel != channel:
            raise Unexpected(f"message {message[:60]!r} for no recovered channel of this connection")
        stream.deliver(int(stamp), int(tail.split(" ", 1)[0]), self.report)

    async def recover_once(self, who: Recoverer, label: str) -> None:
        """One connection of a recovering client: recover, read, then drop it somehow."""
        # An unbounded queue: with websockets' default (16) reading stops while the client
        # does not call recv(), and a clean close then never hears the server's close frame.
        client = await self.open(label, max_queue=None)
        if client is None:
            return
        ws = client.ws
        routes: dict[str, HistoryStream] = {}  # a delivery's prefix (or channel) -> its stream
        try:
            for stream in who.streams.values():
                command = f"rec {stream.channel} {stream.since()}"
                key = stream.channel
                if self.rng.random() < 0.4:
                    key = f"r{next(Client.prefixes)}"
                    command += f" {key}|"
                routes[key] = stream
                stream.pending = []
                await ws.send(command)
            how = self.rng.choice(["close", "abort", "rst"])
            if self.rng.random() < 0.1:
                how += " before the answers"  # the recovers are still running, or their replays in flight
            else:
                client.doing = "waiting for the recover answers"
                deadline = time.monotonic() + 30
                while any(stream.pending is not None for stream in routes.values()):
                    message = await asyncio.wait_for(ws.recv(), deadline - time.monotonic())
                    self.take_history(who, routes, message)
                seconds = self.rng.uniform(0.05, 3.0)
                client.doing = f"reading for {seconds:.1f} s from {time.monotonic() - client.opened:.1f} s"
                deadline = time.monotonic() + seconds
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        message = await asyncio.wait_for(ws.recv(), left)
                    except asyncio.TimeoutError:
                        break
                    self.take_history(who, routes, message)
            self.report.drops[how.split()[0]] += 1
            if how.startswith("close"):
                client.doing = "closing"
                await ws.close()
                rcvd = ws.protocol.close_rcvd
                if rcvd is None or rcvd.code != 1000:
                    self.report.violation(f"{label}: the server answered a 1000 close with {rcvd}")
            elif how.startswith("rst"):
                sock = ws.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            ws.transport.abort()

    # -- after the load -------------------------------------------------------------

    async def settled(
        self, done: Callable[[dict[str, Any]], bool], command: str, seconds: float
    ) -> dict[str, Any]:
        """Ask ``command`` until ``done`` holds for the answer (or ``seconds`` pass); return the last."""
        deadline = time.monotonic() + seconds
        while True:
            answer = await self.ask(command)
            if done(answer) or time.monotonic() > deadline:
                return answer
            await asyncio.sleep(0.2)

    async def check_after(self) -> None:
        r, s, before = self.report, self.settings, self.report.before
        # A close's presence leaves run after its handle_close: wait for them too.
        await self.settled(
            lambda a: (
                a["stats"]["connections"] == 0
                and a["opens"] == a["closes"]
                and a["joins"] == a["leaves"] >= r.presence_joins
            ),
            "sample",
            30,
        )
        # tokio's blocking-pool threads linger for a few seconds after their last task.
        after = await self.settled(
            lambda a: a["threads"] <= before["threads"] and a["fds"] <= before["fds"], "final", 30
        )
        r.after = after

        for text in after["violations"]:
            r.violation(f"worker: {text}")
        if not after["opens"] == after["closes"] == r.connections:
            r.violation(
                f"{r.connections} connections made, but handle_open ran {after['opens']} times "
                f"and handle_close {after['closes']} times"
            )
        if len(set(self.cas_values)) != len(self.cas_values):
            r.violation("compare-and-set handed out the same counter value twice")
        if after["cas"] != after["cas_by_workers"] or len(self.cas_values) > after["cas"]:
            r.violation(
                f"shared counter {after['cas']}, increments made {after['cas_by_workers']}, "
                f"told to clients {len(self.cas_values)}"
            )
        if not after["joins"] == after["leaves"] == r.presence_joins:
            r.violation(
                f"handle_presence reported {after['joins']} joins and {after['leaves']} leaves, "
                f"the clients expected {r.presence_joins} of each"
            )
        if any(after["presence"].values()):
            r.violation(f"presence_count with no client left: {after['presence']}")
        if not r.presence_joins:
            r.violation("no member joined a presence channel")
        floods = r.faults["slow reader (1008)"]
        closes = after["stats"]["backpressure_closes"] - before["stats"]["backpressure_closes"]
        if closes != floods:
            r.violation(f"{closes} backpressure closes for {floods} slow readers")
        stats = after["stats"]
        for key in ("connections", "virtual_sockets", "channels", "subscriptions", "presence_members"):
            if stats[key]:
                r.violation(f"stats()[{key!r}] is {stats[key]} with no client left")
        if stats["keys"] != after["expected_keys"]:
            r.violation(f"{stats['keys']} kv keys left, {after['expected_keys']} expected")
        for key in ("threads", "fds"):
            if after[key] > before[key]:
                r.violation(f"server {key}: {before[key]} before the load, {after[key]} after")
        for name, _, _ in self.scenarios:
            if not r.scenarios[name]:
                r.violation(f"no {name} client ran: the run was too short to test it")
        if not r.messages_checked:
            r.violation("no broadcast was checked")
        if s.recoverers and not (r.recovers["True"] and r.history_checked):
            r.violation("no recover returned True, or no stamped message was checked")
        # History memory is bounded: each channel keeps its last `size` messages, no more.
        sizes = {f"hist{i}": s.history_size for i in range(s.history_channels)} | {"tiny0": s.tiny_size}
        if stats["history_channels"] != len(sizes):
            r.violation(f"stats()['history_channels'] is {stats['history_channels']}, {len(sizes)} expected")
        if stats["history_messages"] > sum(sizes.values()) or (
            all(after["positions"][channel] >= size for channel, size in sizes.items())
            and stats["history_messages"] != sum(sizes.values())
        ):
            r.violation(
                f"stats()['history_messages'] is {stats['history_messages']} for sizes {sizes} "
                f"and positions {after['positions']}"
            )

        loaded = [x for x in r.samples if x["time"] - before["time"] >= s.warmup]
        r.rss_per_hour = slope_per_hour([(x["time"], x["rss"]) for x in loaded])
        if loaded and loaded[0]["heap"] is not None:
            r.heap_per_hour = slope_per_hour([(x["time"], x["heap"]) for x in loaded])
        for what, growth in (("RSS", r.rss_per_hour), ("C heap", r.heap_per_hour)):
            if growth is not None and growth > s.max_growth:
                r.violation(f"server {what} grew {growth / MB:.1f} MB/h after the warm-up")
        if r.rss_per_hour is None:
            r.violation("too few samples after the warm-up for a growth slope")


def run_soak(settings: Settings) -> Report:
    """Run one soak (blocking) and return its report."""
    return asyncio.run(Soak(settings).run())


def main() -> None:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=defaults.duration, help="seconds of load")
    parser.add_argument("--clients", type=int, default=defaults.clients, help="concurrent clients")
    parser.add_argument("--channels", type=int, default=defaults.channels)
    parser.add_argument("--rate", type=float, default=defaults.rate, help="broadcasts/s per channel")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="server worker threads")
    parser.add_argument("--sample-every", type=float, default=defaults.sample_every, help="seconds")
    parser.add_argument("--warmup", type=float, default=defaults.warmup, help="seconds left out of slopes")
    parser.add_argument(
        "--max-growth", type=float, default=defaults.max_growth / MB, help="MB/h allowed (RSS, C heap)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--recoverers", type=int, default=defaults.recoverers, help="clients recovering history channels"
    )
    parser.add_argument("--history-channels", type=int, default=defaults.history_channels)
    parser.add_argument("--history-size", type=int, default=defaults.history_size)
    parser.add_argument("--tiny-size", type=int, default=defaults.tiny_size, help="history of tiny0")
    parser.add_argument(
        "--presence-channels", type=int, default=defaults.presence_channels, help="room0, room1, ..."
    )
    args = parser.parse_args()
    settings = Settings(
        duration=args.duration,
        clients=args.clients,
        channels=args.channels,
        rate=args.rate,
        threads=args.threads,
        sample_every=args.sample_every,
        warmup=args.warmup,
        max_growth=args.max_growth * MB,
        seed=args.seed,
        recoverers=args.recoverers,
        history_channels=args.history_channels,
        history_size=args.history_size,
        tiny_size=args.tiny_size,
        presence_channels=args.presence_channels,
    )
    report = run_soak(settings)
    print(report.summary())
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
