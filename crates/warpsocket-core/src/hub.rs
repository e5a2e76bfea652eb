//! The hub: this process's sockets, virtual sockets, channels, pending
//! upgrades and counters, with the operations of docs/api.md#functions on them (all but
//! the key/value store, which the engine routes). It knows nothing of
//! clusters: the channels that appear or vanish here are reported through a
//! [`ChannelWatcher`], and presence changes handed to a [`PresenceSink`]
//! (which decides them in Redis), both installed by a cluster node.
//!
//! It outlives servers: ids are never reused within a process.
//!
//! Lock order, to stay deadlock-free: a history channel's log, then a
//! socket's links, then a channel shard, then the presence table, then
//! registry shards, then an outbox, then a worker queue. Nothing is held
//! while calling out (to the log, or to the watcher).
//!
//! Presence changes are queued for the workers with the presence table
//! locked, so that every worker queue gets them in the order they happened;
//! a closing connection's close event is queued under the same lock, just
//! before the changes its close makes (see [`Hub::remove_socket`]). A
//! cluster node's sink is handed them under the same lock, so that Redis
//! gets them in that order too.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::channels::{Change, Channels};
use crate::clock;
use crate::dispatch::{Payload, ReadAt};
use crate::errors::{PresenceError, VirtualError};
use crate::frame::{self, Kind};
use crate::frames::Frames;
use crate::handshake::status;
use crate::history::{History, Log, Message, Policies, Policy, Stamp};
use crate::ids::{IdGenerator, IdMap};
use crate::links::{Killed, Links};
use crate::presence::{Change as PresenceChange, Info, Members, Presence};
use crate::registry::{Entry, Prefix, Registry, VirtualSocket, MAX_PREFIX};
use crate::socket::{Queued, Socket, Workers};
use crate::stats::Counters;
use crate::verdict::Verdict;

/// One element of a send or subscribe target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Socket(u64),
    Channel(Bytes),
}

/// Told when a channel gets its first local subscription or loses its
/// last one (not on every subscription change). Called with no lock held.
pub(crate) trait ChannelWatcher: Send + Sync {
    fn channel_appeared(&self, name: &Bytes);
    fn channel_vanished(&self, name: &Bytes);
}

/// Where a cluster node's presence changes go instead of the workers: the
/// cluster's Redis decides whether a member joined or left the cluster, and
/// reports that. Called with the presence table locked (see the lock
/// order), so its calls must not wait.
pub(crate) trait PresenceSink: Send + Sync {
    /// `socket` was tracked in `channel` as `member` with `info` (every
    /// track: the cluster keeps the latest info). The answer is whether
    /// `member` became present in the cluster.
    fn tracked(
        &self,
        socket: &Arc<Socket>,
        channel: Bytes,
        member: Arc<str>,
        info: Option<Info>,
    ) -> Answer;
    /// The change's member left its channel here (its last socket here
    /// went); the answer is whether it left the cluster.
    fn left(&self, socket: &Arc<Socket>, change: PresenceChange) -> Answer;
    /// Waits (bounded) for an answer: false if none came.
    fn wait(&self, answer: Answer) -> bool;
    /// A change could not be handed over (no worker to hear of it): the
    /// cluster is told everything this process holds again.
    fn resync(&self);
}

/// A [`PresenceSink`]'s verdict to come; disconnected when it has none.
pub(crate) type Answer = mpsc::Receiver<bool>;

#[derive(Default)]
pub(crate) struct Hub {
    sockets: Registry,
    channels: Channels,
    /// Upgrades waiting for `handle_open`. Touched twice per connection, never
    /// per message, so one mutex is enough.
    opens: Mutex<IdMap<oneshot::Sender<Verdict>>>,
    pub(crate) stats: Counters,
    ids: IdGenerator,
    connections: AtomicUsize,
    virtual_sockets: AtomicUsize,
    /// Boxed because `ArcSwapOption` holds sized types only.
    watcher: ArcSwapOption<Box<dyn ChannelWatcher>>,
    /// The history channels' sequences and kept messages.
    history: History,
    /// Who is present in which channel; each socket's side of it (where it
    /// is tracked) is in its links, changed with both locked. One mutex:
    /// tracks are rare next to messages, and one lock orders every change
    /// (see the lock order above).
    presence: Mutex<Presence>,
    /// A cluster node's: see [`PresenceSink`].
    presence_sink: ArcSwapOption<Box<dyn PresenceSink>>,
    /// The running server's workers, for changes no socket of this process
    /// caused (a dead node's members leaving the cluster).
    workers: ArcSwapOption<Workers>,
}

/// A subscription that began or ended, for the watcher.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Edge {
    /// `first`: the channel had no subscription before.
    Began { first: bool },
    /// `last`: it was the channel's last.
    Ended { last: bool },
}

impl Hub {
    // -- what a cluster node sets -------------------------------------------

    /// Ids handed out from now on carry `node` (0: a process on its own).
    pub(crate) fn set_node(&self, node: u16) {
        self.ids.set_node(node);
    }

    pub(crate) fn set_watcher(&self, watcher: Option<Box<dyn ChannelWatcher>>) {
        self.watcher.store(watcher.map(Arc::new));
    }

    pub(crate) fn set_presence_sink(&self, sink: Option<Box<dyn PresenceSink>>) {
        self.presence_sink.store(sink.map(Arc::new));
    }

    /// The workers of the server running now (None once it stopped).
    pub(crate) fn set_workers(&self, workers: Option<Arc<Workers>>) {
        self.workers.store(workers);
    }

    fn channel_appeared(&self, name: &Bytes) {
        if let Some(watcher) = self.watcher.load().as_ref() {
            watcher.channel_appeared(name);
        }
    }

    fn channel_vanished(&self, name: &Bytes) {
        if let Some(watcher) = self.watcher.load().as_ref() {
            watcher.channel_vanished(name);
        }
    }

    /// Channels with local subscriptions.
    pub(crate) fn channel_names(&self) -> Vec<Bytes> {
        self.channels.names()
    }

    /// Whether `channel` has a local subscription.
    pub(crate) fn has_channel(&self, channel: &[u8]) -> bool {
        self.channels.contains(channel)
    }

    // -- connections -----------------------------------------------------

    /// Registers a new connection under a fresh id.
    pub(crate) fn add_socket(&self, make: impl FnOnce(u64) -> Socket) -> Arc<Socket> {
        let socket = Arc::new(make(self.ids.next()));
        self.sockets.insert(socket.id, Entry::Real(socket.clone()));
        self.connections.fetch_add(1, Ordering::Relaxed);
        socket
    }

    /// Forgets a connection: out of every channel, untracked from every
    /// channel's presence, its virtual sockets deleted, its pending upgrade
    /// dropped. O(its subscriptions and tracks). `closed` runs (once)
    /// just before the presence changes of the close are queued, with the
    /// presence table locked: the connection's close event, queued there,
    /// reaches its worker before them (`handle_close` runs first) and
    /// before any later change of the same members. A connection that was
    /// never tracked (nor any of its virtual sockets) causes no change, and
    /// `closed` runs without the lock.
    pub(crate) fn remove_socket(&self, id: u64, closed: impl FnOnce()) {
        self.opens.lock().remove(&id);
        if self.delete(id, closed) {
            self.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Deletes `id` and, transitively, the virtual sockets pointing at it;
    /// then untracks them all, calling `then` first (see
    /// [`remove_socket`](Self::remove_socket)).
    fn delete(&self, id: u64, then: impl FnOnce()) -> bool {
        let Some(entry) = self.sockets.remove(id) else {
            then();
            return false;
        };
        // Whose worker hears of the changes: every deleted socket resolves
        // to the root's connection.
        let root = match &entry {
            Entry::Real(socket) => Ok(socket.clone()),
            Entry::Virtual(v) => Err(v.target),
        };
        let mut tracked = Vec::new();
        let mut pending = vec![(id, entry)];
        while let Some((id, entry)) = pending.pop() {
            let Killed {
                channels,
                children,
                presence,
            } = entry.links().lock().kill();
            if !presence.is_empty() {
                tracked.push(presence);
            }
            for channel in &channels {
                if self.channels.update(channel, id, i64::MIN) == (Change::Removed { last: true }) {
                    self.channel_vanished(channel);
                }
            }
            if let Entry::Virtual(_) = entry {
                self.virtual_sockets.fetch_sub(1, Ordering::Relaxed);
            }
            pending.extend(
                children
                    .into_iter()
                    .filter_map(|child| Some((child, self.sockets.remove(child)?))),
            );
        }
        // A `track` changes the links with them locked, and fails on dead
        // ones: what got past them is handed over by `kill`.
        if tracked.is_empty() {
            then();
            return true;
        }
        // The root's target is none of the deleted, so it still resolves,
        // unless a delete of it runs at the same time (which no longer
        // finds the root): then any worker hears of the changes.
        let owner = match root {
            Ok(socket) => Some(socket),
            Err(target) => self.sockets.resolve(target).map(|(socket, _)| socket),
        }
        .or_else(|| self.stand_in());
        let mut changes = Vec::new();
        let sink = self.presence_sink.load_full();
        let mut presence = self.presence.lock();
        then();
        for links in tracked {
            presence.remove(links, &mut changes);
        }
        self.hand_over(sink.as_deref().map(|s| &**s), owner, changes);
        drop(presence);
        true
    }

    /// Hands the changes a socket of `owner`'s made to the sink, or to
    /// `owner`'s worker; called with the presence table locked.
    fn hand_over(
        &self,
        sink: Option<&dyn PresenceSink>,
        owner: Option<Arc<Socket>>,
        changes: Vec<PresenceChange>,
    ) {
        let Some(owner) = owner else {
            for change in changes {
                log::debug!(target: "warpsocket", "presence change with no worker to report it: {change:?}");
            }
            if let Some(sink) = sink {
                sink.resync();
            }
            return;
        };
        match sink {
            Some(sink) => {
                for change in changes {
                    drop(sink.left(&owner, change));
                }
            }
            None => {
                Self::report_presence(changes.into_iter().map(|c| (owner.clone(), c)).collect())
            }
        }
    }

    /// A stand-in socket (id 0, which no call finds: events are queued per
    /// socket) on one of the running server's workers, for changes no
    /// connection of this process caused or whose connection is gone.
    fn stand_in(&self) -> Option<Arc<Socket>> {
        let worker = self.workers.load().as_deref().and_then(Workers::pick)?;
        Some(Arc::new(Socket::new(0, worker, 0)))
    }

    /// Open connections (accepted or upgrading).
    pub(crate) fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub(crate) fn virtual_socket_count(&self) -> usize {
        self.virtual_sockets.load(Ordering::Relaxed)
    }

    pub(crate) fn channel_count(&self) -> usize {
        self.channels.channel_count()
    }

    pub(crate) fn subscription_count(&self) -> usize {
        self.channels.pair_count()
    }

    /// A snapshot of every connection.
    pub(crate) fn all_connections(&self) -> Vec<Arc<Socket>> {
        self.sockets.connections()
    }

    /// Calls `f` for every connection, one registry shard locked (for
    /// reading) at a time; `f` must not call back into the hub.
    pub(crate) fn for_each_connection(&self, f: impl FnMut(&Arc<Socket>)) {
        self.sockets.for_each_connection(f);
    }

    /// The open connection with this id.
    pub(crate) fn connection(&self, id: u64) -> Option<Arc<Socket>> {
        match self.sockets.get(id) {
            Some(Entry::Real(socket)) => Some(socket),
            _ => None,
        }
    }

    // -- sending -----------------------------------------------------------

    /// Sends one message to every target (repeats count again); returns the
    /// number of recipients it was queued for. Each frame is encoded once
    /// and shared: see [`Frames`]. A history channel takes its next offset
    /// (each time it is named) and gets its own, stamped frames: see
    /// [`send_kept`](Self::send_kept).
    pub(crate) fn send(&self, targets: &[Target], kind: Kind, payload: &[u8]) -> usize {
        // Made on first use: a send to history channels only needs none.
        let mut frames: Option<Frames<'_>> = None;
        let mut sent = 0;
        let mut overflowed = Vec::new();
        for target in targets {
            match target {
                Target::Socket(id) => {
                    let frames = frames.get_or_insert_with(|| self.frames(kind, payload));
                    sent +=
                        usize::from(self.deliver_to(*id, frames, payload.len(), &mut overflowed));
                }
                Target::Channel(name) => {
                    // While no history policy is set, one atomic load.
                    if let Some(log) = self.history.log(name) {
                        sent += self.send_kept(&log, name, kind, payload, &mut overflowed);
                        continue;
                    }
                    let frames = frames.get_or_insert_with(|| self.frames(kind, payload));
                    let view = self.channels.subscribers(name);
                    sent += view
                        .ids()
                        .filter(|&id| self.deliver_to(id, frames, payload.len(), &mut overflowed))
                        .count();
                }
            }
        }
        self.report_overflows(overflowed);
        sent
    }

    fn frames<'a>(&'a self, kind: Kind, payload: &'a [u8]) -> Frames<'a> {
        Frames::new(kind, payload, &self.stats.messages_compressed)
    }

    fn stamped_frames<'a>(&'a self, kind: Kind, stamp: &'a [u8], payload: &'a [u8]) -> Frames<'a> {
        Frames::stamped(kind, stamp, payload, &self.stats.messages_compressed)
    }

    /// Sends to a history channel. The offset is taken and every
    /// subscriber's frame queued under the channel's log lock: every outbox
    /// then gets the channel's messages in offset order, and a
    /// [`recover`](Self::recover), which subscribes under the same lock,
    /// finds each message either kept before it or delivered live after it.
    /// Queueing is a push onto an outbox per recipient, so the lock is short.
    fn send_kept(
        &self,
        log: &Mutex<Log>,
        name: &[u8],
        kind: Kind,
        payload: &[u8],
        overflowed: &mut Vec<u64>,
    ) -> usize {
        let mut log = log.lock();
        let offset = self.history.push(&mut log, kind, payload, clock::now_ms());
        let stamp = log.stamps().then(|| Stamp::new(offset));
        let stamp = stamp.as_deref().unwrap_or_default();
        let mut frames = self.stamped_frames(kind, stamp, payload);
        let len = stamp.len() + payload.len();
        let view = self.channels.subscribers(name);
        let sent = view
            .ids()
            .filter(|&id| self.deliver_to(id, &mut frames, len, overflowed))
            .count();
        sent
    }

    /// Queues one message of a history channel whose offset was assigned
    /// elsewhere (a cluster's Redis) to every local subscriber of `channel`
    /// but those in `skip` (held by a recover); stamped with `offset` when
    /// given. Returns the number of recipients.
    pub(crate) fn relay_kept(
        &self,
        channel: &[u8],
        skip: &[u64],
        offset: Option<u64>,
        kind: Kind,
        payload: &[u8],
        overflowed: &mut Vec<u64>,
    ) -> usize {
        let stamp = offset.map(Stamp::new);
        let stamp = stamp.as_deref().unwrap_or_default();
        let mut frames = self.stamped_frames(kind, stamp, payload);
        let len = stamp.len() + payload.len();
        let view = self.channels.subscribers(channel);
        let sent = view
            .ids()
            .filter(|id| !skip.contains(id))
            .filter(|&id| self.deliver_to(id, &mut frames, len, overflowed))
            .count();
        sent
    }

    /// Queues one message of a history channel to each of `ids` (distinct),
    /// as [`relay_kept`](Self::relay_kept) does to subscribers.
    pub(crate) fn replay_kept(
        &self,
        ids: &[u64],
        offset: Option<u64>,
        kind: Kind,
        payload: &[u8],
        overflowed: &mut Vec<u64>,
    ) {
        let stamp = offset.map(Stamp::new);
        let stamp = stamp.as_deref().unwrap_or_default();
        let mut frames = self.stamped_frames(kind, stamp, payload);
        let len = stamp.len() + payload.len();
        for &id in ids {
            self.deliver_to(id, &mut frames, len, overflowed);
        }
    }

    /// Local subscription entries of `channel` (what a send to it reaches here).
    pub(crate) fn subscriber_count(&self, channel: &[u8]) -> usize {
        let view = self.channels.subscribers(channel);
        let count = view.ids().count();
        count
    }

    /// [`deliver`](Self::deliver), noting a connection that went over its
    /// backpressure limit; true when queued.
    fn deliver_to(
        &self,
        id: u64,
        frames: &mut Frames<'_>,
        payload_len: usize,
        overflowed: &mut Vec<u64>,
    ) -> bool {
        match self.deliver(id, frames, payload_len) {
            (_, Queued::Yes) => true,
            (socket, Queued::Overflow) => {
                overflowed.push(socket);
                false
            }
            (_, Queued::No) => false,
        }
    }

    /// Counts and logs the backpressure closes of a send, once every lock
    /// is released: the log may call into Python.
    pub(crate) fn report_overflows(&self, overflowed: Vec<u64>) {
        for socket in overflowed {
            Counters::add(&self.stats.backpressure_closes, 1);
            self.stats.closes.count(frame::close_code::POLICY);
            log::warn!(target: "warpsocket", "socket {socket}: closed with 1008, outgoing backpressure limit exceeded");
        }
    }

    /// Queues the message for the connection `id` resolves to; returns that
    /// connection's id and the outcome. It counts the message and its payload
    /// bytes as delivered (a virtual socket's prefix is part of them) before
    /// the frame is queued, and takes them back if it was not: once queued,
    /// the peer may read it before this thread runs again, and must not find
    /// `stats()` behind what it received.
    fn deliver(&self, id: u64, frames: &mut Frames<'_>, payload_len: usize) -> (u64, Queued) {
        let Some((socket, prefix)) = self.sockets.resolve(id) else {
            return (id, Queued::No);
        };
        let bytes = (prefix.as_ref().map_or(0, |p| p.len()) + payload_len) as u64;
        Counters::add(&self.stats.messages_out, 1);
        Counters::add(&self.stats.bytes_out, bytes);
        let queued = socket.send(frames.for_socket(&socket, prefix));
        if queued != Queued::Yes {
            Counters::sub(&self.stats.messages_out, 1);
            Counters::sub(&self.stats.bytes_out, bytes);
        }
        (socket.id, queued)
    }

    /// Starts the close handshake of the connection `id` resolves to; false
    /// when there is none or it is already closing.
    pub(crate) fn close(&self, id: u64, code: u16, reason: &str) -> bool {
        let closing = self
            .sockets
            .resolve(id)
            .is_some_and(|(socket, _)| socket.close(code, reason));
        if closing {
            self.stats.closes.count(code);
        }
        closing
    }

    // -- channels ------------------------------------------------------------

    /// Adds `delta` to the subscription count of every socket `targets` names
    /// (a channel target names its current subscribers) on `channel`. Returns
    /// the ids that became subscribed (`delta > 0`) or unsubscribed (`delta < 0`).
    pub(crate) fn subscribe(&self, targets: &[Target], channel: &Bytes, delta: i64) -> Vec<u64> {
        let mut changed = Vec::new();
        if delta == 0 {
            return changed;
        }
        for target in targets {
            match target {
                Target::Socket(id) => {
                    if self.subscribe_one(*id, channel, delta) {
                        changed.push(*id);
                    }
                }
                Target::Channel(source) => {
                    let ids: Vec<u64> = self.channels.subscribers(source).ids().collect();
                    changed.extend(
                        ids.into_iter()
                            .filter(|&id| self.subscribe_one(id, channel, delta)),
                    );
                }
            }
        }
        changed
    }

    /// True when `id` became subscribed (`delta > 0`) or unsubscribed
    /// (`delta < 0`): a count change in one direction can only do that.
    fn subscribe_one(&self, id: u64, channel: &Bytes, delta: i64) -> bool {
        let edge = self.change_subscription(id, channel, delta);
        if let Some(edge) = edge {
            self.announce(channel, edge);
        }
        edge.is_some()
    }

    /// Changes `id`'s count on `channel`; the subscription that began or
    /// ended, for the caller to [`announce`](Self::announce) once it holds
    /// no lock.
    fn change_subscription(&self, id: u64, channel: &Bytes, delta: i64) -> Option<Edge> {
        let entry = self.sockets.get(id)?;
        if !self.resolves_open(id) {
            return None;
        }
        // Holding the links while the channel changes keeps the two indexes in
        // step with a concurrent delete, which marks the links dead first.
        let mut links = entry.links().lock();
        if links.dead {
            return None;
        }
        match self.channels.update(channel, id, delta) {
            // The name as the channel stores it: every subscriber's links
            // share one allocation of it.
            Change::Added { name, first } => {
                links.add_channel(name);
                Some(Edge::Began { first })
            }
            Change::Removed { last } => {
                links.remove_channel(channel);
                Some(Edge::Ended { last })
            }
            Change::Kept => None,
        }
    }

    /// Tells the watcher of a channel that appeared or vanished.
    fn announce(&self, channel: &Bytes, edge: Edge) {
        match edge {
            Edge::Began { first: true } => self.channel_appeared(channel),
            Edge::Ended { last: true } => self.channel_vanished(channel),
            Edge::Began { first: false } | Edge::Ended { last: false } => {}
        }
    }

    /// True if a local subscriber of `channel` resolves to an open connection.
    pub(crate) fn has_subscriptions(&self, channel: &[u8]) -> bool {
        let view = self.channels.subscribers(channel);
        let live = view.ids().any(|id| self.resolves_open(id));
        live
    }

    /// `id` resolves to a connection that is not closing: a closing
    /// connection counts as gone for subscriptions and new virtual sockets.
    fn resolves_open(&self, id: u64) -> bool {
        self.sockets
            .resolve(id)
            .is_some_and(|(socket, _)| socket.is_open())
    }

    // -- history ------------------------------------------------------------

    /// Sets the history policies; every channel's history so far is
    /// forgotten (the sequences that follow have new epochs).
    pub(crate) fn set_history(&self, policies: Policies) {
        self.history.configure(policies);
    }

    /// The history policy covering `channel`, if any.
    pub(crate) fn history_policy(&self, channel: &[u8]) -> Option<Policy> {
        self.history.policy(channel)
    }

    /// Returns the memory of expired history (at most once a second).
    pub(crate) fn sweep_history(&self) {
        self.history.sweep(clock::now_ms());
    }

    pub(crate) fn history_channel_count(&self) -> usize {
        self.history.channel_count()
    }

    pub(crate) fn history_message_count(&self) -> usize {
        self.history.message_count()
    }

    /// `(epoch, offset of the last message)` of a history channel; None
    /// when no policy covers it.
    pub(crate) fn position(&self, channel: &[u8]) -> Option<(Arc<str>, u64)> {
        let log = self.history.log(channel)?;
        let mut log = log.lock();
        self.history.refresh(&mut log, clock::now_ms());
        Some((log.epoch().clone(), log.last()))
    }

    /// The kept messages of a history channel with an offset above `since`,
    /// oldest first, at most `limit` (the oldest); None when no policy
    /// covers the channel.
    pub(crate) fn history(&self, channel: &[u8], since: u64, limit: usize) -> Option<Vec<Message>> {
        let log = self.history.log(channel)?;
        let mut log = log.lock();
        self.history.refresh(&mut log, clock::now_ms());
        let kept = log
            .after(since)
            .take(limit)
            .map(|(offset, kept)| (offset, kept.kind, Bytes::copy_from_slice(&kept.data)))
            .collect();
        Some(kept)
    }

    /// Subscribes `targets` to the history channel `channel` (as
    /// `subscribe`, delta 1) and, when the client that saw `since` (epoch,
    /// offset) missed nothing that is not kept, queues them every kept
    /// message after it, stamped like live ones. Returns whether it did;
    /// None when no policy covers the channel.
    ///
    /// Atomic with sends: the channel's log stays locked from before the
    /// subscription until the last kept frame is queued, and a send queues
    /// under the same lock (see [`send_kept`](Self::send_kept)), so each
    /// message reaches the targets once, in offset order: kept if sent
    /// before, live if after.
    pub(crate) fn recover(
        &self,
        targets: &[u64],
        channel: &Bytes,
        since: (&str, u64),
    ) -> Option<bool> {
        let log = self.history.log(channel)?;
        let mut edges = Vec::new();
        let mut overflowed = Vec::new();
        let recovered = {
            let mut log = log.lock();
            self.history.refresh(&mut log, clock::now_ms());
            edges.extend(
                targets
                    .iter()
                    .filter_map(|&id| self.change_subscription(id, channel, 1)),
            );
            let recovered = log.recoverable(since.0, since.1);
            if recovered {
                // Once per socket, as a channel delivers once per subscriber.
                let mut distinct = targets.to_vec();
                distinct.sort_unstable();
                distinct.dedup();
                for (offset, kept) in log.after(since.1) {
                    let stamp = log.stamps().then(|| Stamp::new(offset));
                    let stamp = stamp.as_deref().unwrap_or_default();
                    let mut frames = self.stamped_frames(kept.kind, stamp, &kept.data);
                    let len = stamp.len() + kept.data.len();
                    for &id in &distinct {
                        self.deliver_to(id, &mut frames, len, &mut overflowed);
                    }
                }
            }
            recovered
        };
        for edge in edges {
            self.announce(channel, edge);
        }
        self.report_overflows(overflowed);
        Some(recovered)
    }

    // -- virtual sockets -----------------------------------------------------

    /// Creates a virtual socket pointing at `target` (a connection or another
    /// virtual socket).
    pub(crate) fn create_virtual_socket(
        &self,
        target: u64,
        prefix: Option<&[u8]>,
    ) -> Result<u64, VirtualError> {
        let prefix: Option<Prefix> = match prefix {
            Some(p) if p.len() > MAX_PREFIX => return Err(VirtualError::PrefixTooLong),
            Some(p) if !p.is_empty() => Some(Bytes::copy_from_slice(p)),
            _ => None,
        };
        let Some(parent) = self.sockets.get(target) else {
            return Err(VirtualError::NoSuchSocket);
        };
        if !self.resolves_open(target) {
            return Err(VirtualError::NoSuchSocket);
        }
        let id = self.ids.next();
        let virtual_socket = Arc::new(VirtualSocket {
            target,
            prefix,
            links: Links::default(),
        });
        // Registered before it is linked: a delete of the parent that runs in
        // between then finds and removes it.
        self.sockets.insert(id, Entry::Virtual(virtual_socket));
        self.virtual_sockets.fetch_add(1, Ordering::Relaxed);
        let mut links = parent.links().lock();
        if links.dead {
            drop(links);
            self.delete(id, || {});
            return Err(VirtualError::NoSuchSocket);
        }
        links.add_child(id);
        Ok(id)
    }

    /// Deletes a virtual socket (and those pointing at it), removing it from
    /// every channel. With `expected_target`, only if it points there.
    pub(crate) fn delete_virtual_socket(&self, id: u64, expected_target: Option<u64>) -> bool {
        let Some(Entry::Virtual(v)) = self.sockets.get(id) else {
            return false;
        };
        if expected_target.is_some_and(|t| t != v.target) {
            return false;
        }
        if !self.delete(id, || {}) {
            return false;
        }
        if let Some(parent) = self.sockets.get(v.target) {
            parent.links().lock().remove_child(id);
        }
        true
    }

    // -- presence ------------------------------------------------------------

    /// Tracks the socket `id` (a connection or a virtual socket, which is
    /// tracked apart from its connection) in `channel` as `member` with
    /// `info`, replacing the member it was tracked as there. True if
    /// `member` became present.
    pub(crate) fn track(
        &self,
        id: u64,
        channel: &[u8],
        member: &str,
        info: Option<Info>,
    ) -> Result<bool, PresenceError> {
        let entry = self.sockets.get(id).ok_or(PresenceError::NoSuchSocket)?;
        // Held throughout: a delete kills the links (and takes their
        // presence side) before it locks the table.
        let mut links = entry.links().lock();
        if links.dead {
            return Err(PresenceError::NoSuchSocket);
        }
        let mut changes = Vec::new();
        let sink = self.presence_sink.load_full();
        let mut presence = self.presence.lock();
        // Checked with the table locked: a closing connection is not tracked.
        let socket = match self.sockets.resolve(id) {
            Some((socket, _)) if socket.is_open() => socket,
            _ => return Err(PresenceError::NoSuchSocket),
        };
        let Some(sink) = sink.as_deref() else {
            let joined = presence.track(&mut links.presence, channel, member, info, &mut changes);
            Self::report_presence(changes.into_iter().map(|c| (socket.clone(), c)).collect());
            drop(presence);
            return Ok(joined);
        };
        presence.track(
            &mut links.presence,
            channel,
            member,
            info.clone(),
            &mut changes,
        );
        // A replaced member's leave; its join is the cluster's to decide.
        for change in changes.into_iter().filter(|c| !c.joined) {
            drop(sink.left(&socket, change));
        }
        let answer = sink.tracked(
            &socket,
            Bytes::copy_from_slice(channel),
            member.into(),
            info,
        );
        drop(presence);
        drop(links);
        Ok(sink.wait(answer))
    }

    /// Untracks the socket `id` from `channel`. True if its member left
    /// (it was the member's last tracked socket there); false too when it
    /// was not tracked there, or is gone (and so untracked already).
    pub(crate) fn untrack(&self, id: u64, channel: &[u8]) -> bool {
        let Some(entry) = self.sockets.get(id) else {
            return false;
        };
        let mut links = entry.links().lock();
        if links.presence.is_empty() {
            // Never tracked, untracked, or deleted (`kill` took them).
            return false;
        }
        let sink = self.presence_sink.load_full();
        let mut presence = self.presence.lock();
        let Some(change) = presence.untrack(&mut links.presence, channel) else {
            return false;
        };
        // A virtual socket's target resolves unless it is being deleted
        // (this socket next): then any worker hears of the change.
        let owner = match &entry {
            Entry::Real(socket) => Some(socket.clone()),
            Entry::Virtual(v) => self.sockets.resolve(v.target).map(|(socket, _)| socket),
        }
        .or_else(|| self.stand_in());
        let Some(sink) = sink.as_deref() else {
            self.hand_over(None, owner, vec![change]);
            return true;
        };
        let Some(owner) = owner else {
            return true;
        };
        let answer = sink.left(&owner, change);
        drop(presence);
        drop(links);
        sink.wait(answer)
    }

    /// The members present in `channel`, with the info of their latest track.
    pub(crate) fn presence(&self, channel: &[u8]) -> Members {
        self.presence.lock().members(channel)
    }

    /// How many members are present in `channel`.
    pub(crate) fn presence_count(&self, channel: &[u8]) -> usize {
        self.presence.lock().count(channel)
    }

    /// (channel, member) pairs present through this process's sockets.
    pub(crate) fn presence_member_count(&self) -> usize {
        self.presence.lock().pairs()
    }

    /// Runs `with` on every (channel, member) pair present here, with the
    /// table locked: a sink that queues them there orders them among the
    /// changes.
    pub(crate) fn presence_snapshot(
        &self,
        with: impl FnOnce(Vec<(Bytes, Arc<str>, Option<Info>)>),
    ) {
        let presence = self.presence.lock();
        with(presence.snapshot());
        drop(presence);
    }

    /// Queues changes no socket of this process caused, each for a worker
    /// of the running server (none: they are logged and dropped).
    pub(crate) fn report_presence_anywhere(&self, changes: Vec<PresenceChange>) {
        for change in changes {
            let Some(stand_in) = self.stand_in() else {
                log::debug!(target: "warpsocket", "presence change with no worker to report it: {change:?}");
                continue;
            };
            stand_in.worker.push(
                &stand_in,
                Payload::Presence(Box::new(change)),
                ReadAt::now(),
            );
        }
    }

    /// Queues each change for the worker of the connection it came
    /// through; called with the presence table locked, so that each worker
    /// queue gets the changes in the order they happened (or, for a cluster
    /// node, by its one task that hears Redis's verdicts, in their order).
    pub(crate) fn report_presence(changes: Vec<(Arc<Socket>, PresenceChange)>) {
        if changes.is_empty() {
            return;
        }
        let now = ReadAt::now();
        for (socket, change) in changes {
            socket
                .worker
                .push(&socket, Payload::Presence(Box::new(change)), now);
        }
    }

    // -- upgrades and worker bookkeeping -------------------------------------

    /// Ends every connection pinned to a retired worker at once: accepted ones
    /// are closed with `code`, upgrades still waiting for `handle_open` are
    /// refused with 500. Returns how many were found. Scans all connections;
    /// it runs only when a worker is retired.
    pub(crate) fn end_worker_connections(&self, worker_id: u32, code: u16, reason: &str) -> usize {
        let mine: Vec<Arc<Socket>> = self
            .sockets
            .connections()
            .into_iter()
            .filter(|s| s.worker.id() == worker_id)
            .collect();
        for socket in &mine {
            if socket.is_accepted() {
                if socket.close(code, reason) {
                    self.stats.closes.count(code);
                }
            } else if let Some(waiting) = self.opens.lock().remove(&socket.id) {
                let _ = waiting.send(Verdict::Refuse(status::INTERNAL_ERROR));
            }
        }
        mine.len()
    }

    /// Delivers `handle_open`'s verdict. False when the upgrade is no longer
    /// waiting (the client left, or the server is stopping).
    pub(crate) fn resolve_open(&self, id: u64, verdict: Verdict) -> bool {
        let Some(waiting) = self.opens.lock().remove(&id) else {
            return false;
        };
        if verdict == Verdict::Accept {
            match self.sockets.get(id) {
                Some(Entry::Real(socket)) => socket.accept(),
                _ => return false,
            }
        }
        waiting.send(verdict).is_ok()
    }

    pub(crate) fn wait_for_verdict(&self, id: u64) -> oneshot::Receiver<Verdict> {
        let (tx, rx) = oneshot::channel();
        self.opens.lock().insert(id, tx);
        rx
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::frame::FrameBytes;
    use crate::socket::Workers;

    struct Fixture {
        hub: Hub,
        workers: Workers,
    }

    impl Fixture {
        fn new() -> Self {
            let workers = Workers::default();
            workers.add().unwrap();
            Fixture {
                hub: Hub::default(),
                workers,
            }
        }

        fn connect(&self) -> Arc<Socket> {
            let worker = self.workers.pick().unwrap();
            self.hub.add_socket(|id| Socket::new(id, worker, 1 << 20))
        }
    }

    /// Frames queued for a socket, as (opcode, payload).
    fn received(socket: &Socket) -> Vec<(u8, Vec<u8>)> {
        let mut frames = VecDeque::new();
        socket.take(&mut frames, false);
        frames
            .iter()
            .map(|f| {
                let len = f[1] as usize & 0x7f;
                assert!(len < 126, "test frames are small");
                (f[0] & 0x0f, f[2..2 + len].to_vec())
            })
            .collect()
    }

    fn ch(name: &str) -> Bytes {
        Bytes::copy_from_slice(name.as_bytes())
    }

    #[test]
    fn send_counts_recipients_and_shares_the_frame() {
        let f = Fixture::new();
        let (a, b) = (f.connect(), f.connect());
        let targets = [
            Target::Socket(a.id),
            Target::Socket(b.id),
            Target::Socket(a.id),
            Target::Socket(999),
        ];
        assert_eq!(f.hub.send(&targets, Kind::Text, b"hi"), 3);
        assert_eq!(received(&a), vec![(1, b"hi".to_vec()), (1, b"hi".to_vec())]);
        assert_eq!(received(&b), vec![(1, b"hi".to_vec())]);
    }

    /// The frames queued for a socket, as they are.
    fn taken(socket: &Socket) -> Vec<FrameBytes> {
        let mut frames = VecDeque::new();
        socket.take(&mut frames, false);
        frames.into()
    }

    /// The payload of a compressed frame (RSV1 set), inflated.
    fn inflated(frame: &FrameBytes) -> Vec<u8> {
        assert_eq!(frame[0] & 0x40, 0x40, "RSV1 marks it compressed");
        let start = match frame[1] {
            126 => 4,
            len => {
                assert!(len < 126, "test messages are under 64 KiB");
                2
            }
        };
        let mut out = Vec::new();
        crate::deflate::inflate_message(&frame[start..], &mut out, 1 << 20).unwrap();
        out
    }

    #[test]
    fn a_broadcast_is_compressed_once_per_distinct_prefix() {
        use crate::deflate::Negotiated;
        let f = Fixture::new();
        let negotiated = |server_window_bits| Some(Negotiated { server_window_bits });
        let connect = |deflate| {
            let worker = f.workers.pick().unwrap();
            f.hub
                .add_socket(|id| Socket::new(id, worker, 1 << 20).with_deflate(deflate))
        };
        let deflating: Vec<_> = (0..3).map(|_| connect(negotiated(15))).collect();
        let plain = connect(None);
        // A client that asked for a 512-byte window gets longer messages plain.
        let small_window = connect(negotiated(9));
        let v1 = f
            .hub
            .create_virtual_socket(deflating[0].id, Some(b"v:"))
            .unwrap();
        let v2 = f
            .hub
            .create_virtual_socket(deflating[1].id, Some(b"v:"))
            .unwrap();
        let v3 = f.hub.create_virtual_socket(plain.id, Some(b"v:")).unwrap();
        let room = ch("room");
        let mut members: Vec<Target> = deflating.iter().map(|s| Target::Socket(s.id)).collect();
        members.extend([plain.id, small_window.id, v1, v2, v3].map(Target::Socket));
        f.hub.subscribe(&members, &room, 1);

        let payload = r#"{"user":"ada","text":"hello, room","ts":1700000000}"#.repeat(20);
        assert!(payload.len() > 512 && payload.len() < 0xffff);
        let sent = f
            .hub
            .send(&[Target::Channel(room)], Kind::Text, payload.as_bytes());
        assert_eq!(sent, 8);
        assert_eq!(
            Counters::get(&f.hub.stats.messages_compressed),
            2,
            "once plain, once with the prefix"
        );
        // Every compressed frame of one form is the same allocation (the order in
        // which a socket got the direct and the prefixed copy follows the channel's).
        let prefixed_payload = format!("v:{payload}");
        let mut forms: Vec<(Vec<u8>, FrameBytes)> = Vec::new();
        for socket in &deflating {
            for frame in taken(socket) {
                let inflated = inflated(&frame);
                match forms.iter().find(|(p, _)| *p == inflated) {
                    Some((_, first)) => assert_eq!(first.as_ptr(), frame.as_ptr()),
                    None => forms.push((inflated, frame)),
                }
            }
        }
        let mut contents: Vec<&[u8]> = forms.iter().map(|(p, _)| p.as_slice()).collect();
        let mut expected = [payload.as_bytes(), prefixed_payload.as_bytes()];
        contents.sort();
        expected.sort();
        assert_eq!(contents, expected);
        let direct = &forms
            .iter()
            .find(|(p, _)| p == payload.as_bytes())
            .unwrap()
            .1;
        assert!(direct.len() < payload.len() / 3, "{} bytes", direct.len());
        for frames in [taken(&plain), taken(&small_window)] {
            for frame in &frames {
                assert_eq!(frame[0], 0x81, "plain text, RSV1 clear");
            }
        }
        assert_eq!(
            Counters::get(&f.hub.stats.bytes_out),
            8 * payload.len() as u64 + 3 * 2,
            "byte counts are uncompressed (with the prefixes)"
        );
    }

    #[test]
    fn short_messages_go_out_uncompressed() {
        use crate::deflate::{Negotiated, MIN_COMPRESS_SIZE};
        let f = Fixture::new();
        let worker = f.workers.pick().unwrap();
        let deflate = Some(Negotiated {
            server_window_bits: 15,
        });
        let a = f
            .hub
            .add_socket(|id| Socket::new(id, worker, 1 << 20).with_deflate(deflate));
        let short = "a".repeat(MIN_COMPRESS_SIZE - 1);
        f.hub
            .send(&[Target::Socket(a.id)], Kind::Text, short.as_bytes());
        let frames = taken(&a);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0][0], 0x81, "RSV1 clear");
        assert_eq!(&frames[0][4..], short.as_bytes());
        assert_eq!(Counters::get(&f.hub.stats.messages_compressed), 0);
    }

    #[test]
    fn backpressure_counts_what_waits_not_one_large_message() {
        let f = Fixture::new();
        let worker = f.workers.pick().unwrap();
        let small = f.hub.add_socket(|id| Socket::new(id, worker, 100));
        let target = [Target::Socket(small.id)];
        assert_eq!(
            f.hub.send(&target, Kind::Binary, &[0; 150]),
            1,
            "alone in the queue: sent"
        );
        assert_eq!(
            f.hub.send(&target, Kind::Binary, &[0; 1]),
            0,
            "behind it: over the limit"
        );
        assert_eq!(Counters::get(&f.hub.stats.backpressure_closes), 1);
        assert!(
            !f.hub.close(small.id, 1000, ""),
            "already closing with 1008"
        );
    }

    #[test]
    fn channel_subscriptions_are_reference_counted() {
        let f = Fixture::new();
        let (a, b) = (f.connect(), f.connect());
        let room = ch("room");
        let both = [Target::Socket(a.id), Target::Socket(b.id)];
        assert_eq!(f.hub.subscribe(&both, &room, 1), vec![a.id, b.id]);
        assert_eq!(f.hub.subscribe(&[Target::Socket(a.id)], &room, 1), vec![]);
        assert_eq!(
            f.hub
                .send(&[Target::Channel(room.clone())], Kind::Binary, b"x"),
            2
        );
        assert_eq!(f.hub.subscribe(&both, &room, -1), vec![b.id]);
        assert!(f.hub.has_subscriptions(&room));
        assert_eq!(f.hub.subscribe(&both, &room, -1), vec![a.id]);
        assert!(!f.hub.has_subscriptions(&room));
        assert_eq!((f.hub.channel_count(), f.hub.subscription_count()), (0, 0));
        assert_eq!(f.hub.subscribe(&both, &room, 0), vec![]);
        assert_eq!(f.hub.subscribe(&[Target::Socket(12345)], &room, 1), vec![]);
    }

    #[test]
    fn channel_to_channel_subscribe_applies_delta_to_each_subscriber() {
        let f = Fixture::new();
        let (a, b) = (f.connect(), f.connect());
        let (src, dst) = (ch("src"), ch("dst"));
        f.hub
            .subscribe(&[Target::Socket(a.id), Target::Socket(b.id)], &src, 1);
        f.hub.subscribe(&[Target::Socket(a.id)], &dst, 1);
        assert_eq!(
            f.hub.subscribe(&[Target::Channel(src.clone())], &dst, 1),
            vec![b.id]
        );
        assert_eq!(
            f.hub.subscribe(&[Target::Channel(src.clone())], &dst, -1),
            vec![b.id]
        );
        assert_eq!(
            f.hub.subscribe(&[Target::Channel(src)], &dst, -1),
            vec![a.id]
        );
    }

    #[test]
    fn virtual_sockets_prefix_and_chain() {
        let f = Fixture::new();
        let a = f.connect();
        let v1 = f.hub.create_virtual_socket(a.id, Some(b"r1:")).unwrap();
        let v2 = f.hub.create_virtual_socket(v1, None).unwrap();
        let v3 = f.hub.create_virtual_socket(v2, Some(b"r3:")).unwrap();
        let bad = f.hub.create_virtual_socket(a.id, Some(&[0xff])).unwrap();
        assert_eq!(
            f.hub.create_virtual_socket(a.id, Some(&[b'x'; 16])),
            Err(VirtualError::PrefixTooLong)
        );
        assert_eq!(
            f.hub.create_virtual_socket(9999, None),
            Err(VirtualError::NoSuchSocket)
        );
        for id in [v1, v2, v3, bad] {
            assert_eq!(f.hub.send(&[Target::Socket(id)], Kind::Text, b"m"), 1);
        }
        // Payload bytes as delivered, prefixes included.
        assert_eq!(Counters::get(&f.hub.stats.bytes_out), 4 + 4 + 4 + 2);
        assert_eq!(
            received(&a),
            vec![
                (1, b"r1:m".to_vec()),
                (1, b"r1:m".to_vec()),
                (1, b"r3:m".to_vec()),
                (2, b"\xffm".to_vec())
            ]
        );
    }

    #[test]
    fn direct_and_virtual_subscriptions_each_get_a_copy() {
        let f = Fixture::new();
        let a = f.connect();
        let v = f.hub.create_virtual_socket(a.id, Some(b"v:")).unwrap();
        let room = ch("room");
        f.hub
            .subscribe(&[Target::Socket(a.id), Target::Socket(v)], &room, 1);
        assert_eq!(
            f.hub
                .send(&[Target::Channel(room.clone())], Kind::Text, b"x"),
            2
        );
        let mut got = received(&a);
        got.sort();
        assert_eq!(got, vec![(1, b"v:x".to_vec()), (1, b"x".to_vec())]);
        assert_eq!(f.hub.subscription_count(), 2);
    }

    #[test]
    fn deleting_a_virtual_socket_cascades_and_leaves_channels() {
        let f = Fixture::new();
        let a = f.connect();
        let v1 = f.hub.create_virtual_socket(a.id, None).unwrap();
        let v2 = f.hub.create_virtual_socket(v1, None).unwrap();
        let room = ch("room");
        f.hub
            .subscribe(&[Target::Socket(v1), Target::Socket(v2)], &room, 1);
        assert!(!f.hub.delete_virtual_socket(v1, Some(a.id + 1000)));
        assert!(f.hub.delete_virtual_socket(v1, Some(a.id)));
        assert!(!f.hub.delete_virtual_socket(v1, None));
        assert_eq!(f.hub.send(&[Target::Socket(v2)], Kind::Text, b"x"), 0);
        assert_eq!(
            (f.hub.virtual_socket_count(), f.hub.subscription_count()),
            (0, 0)
        );
        assert!(
            !f.hub.delete_virtual_socket(a.id, None),
            "not a virtual socket"
        );
    }

    #[test]
    fn closing_a_connection_cleans_up_everything_it_had() {
        let f = Fixture::new();
        let (a, b) = (f.connect(), f.connect());
        let v = f.hub.create_virtual_socket(a.id, Some(b"p")).unwrap();
        for name in ["x", "y", "z"] {
            f.hub.subscribe(
                &[
                    Target::Socket(a.id),
                    Target::Socket(v),
                    Target::Socket(b.id),
                ],
                &ch(name),
                1,
            );
        }
        f.hub.remove_socket(a.id, || {});
        assert_eq!(f.hub.connection_count(), 1);
        assert_eq!(f.hub.virtual_socket_count(), 0);
        assert_eq!(f.hub.subscription_count(), 3);
        assert_eq!(
            f.hub.send(
                &[Target::Socket(v), Target::Channel(ch("x"))],
                Kind::Text,
                b"m"
            ),
            1
        );
        assert!(!f.hub.close(a.id, 1000, ""));
        assert!(f.hub.close(b.id, 1000, ""));
        assert!(!f.hub.close(b.id, 1000, ""), "already closing");
        assert!(
            !f.hub.has_subscriptions(b"x"),
            "a closing connection counts as gone"
        );
        assert_eq!(
            f.hub.create_virtual_socket(b.id, None),
            Err(VirtualError::NoSuchSocket)
        );
        assert_eq!(
            f.hub.subscribe(&[Target::Socket(b.id)], &ch("w"), 1),
            vec![]
        );
    }

    fn policy(size: usize, stamp: bool) -> crate::history::Policy {
        crate::history::Policy {
            size,
            ttl: std::time::Duration::from_secs(600),
            stamp,
        }
    }

    /// Sets `stop` when dropped, so that a failed assertion ends the senders.
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    #[test]
    fn history_channels_stamp_in_offset_order_and_recover_what_was_missed() {
        let f = Fixture::new();
        f.hub.set_history(Policies::new([
            (ch("h:"), policy(3, true)),
            (ch("plain:"), policy(3, false)),
        ]));
        let (a, b) = (f.connect(), f.connect());
        let v = f.hub.create_virtual_socket(b.id, Some(b"v|")).unwrap();
        let room = ch("h:1");
        let to_room = [Target::Channel(room.clone())];
        f.hub.subscribe(&[Target::Socket(a.id)], &room, 1);
        for m in ["m1", "m2", "m3", "m4"] {
            assert_eq!(f.hub.send(&to_room, Kind::Text, m.as_bytes()), 1);
        }
        let stamped: Vec<(u8, Vec<u8>)> =
            (1..=4).map(|i| (1, format!("{i}:m{i}").into())).collect();
        assert_eq!(received(&a), stamped);
        let (epoch, last) = f.hub.position(&room).unwrap();
        assert_eq!(last, 4);
        // Kept: 2, 3, 4.
        assert_eq!(f.hub.recover(&[v, v], &room, (&epoch, 1)), Some(true));
        assert_eq!(
            received(&b),
            vec![
                (1, b"v|2:m2".to_vec()),
                (1, b"v|3:m3".to_vec()),
                (1, b"v|4:m4".to_vec())
            ],
            "once per socket, prefixed and stamped"
        );
        f.hub.send(&to_room, Kind::Binary, b"m5");
        assert_eq!(received(&b), vec![(2, b"v|5:m5".to_vec())]);
        assert_eq!(received(&a), vec![(2, b"5:m5".to_vec())]);
        let c = f.connect();
        for since in [(&*epoch, 1), ("another", 5), (&*epoch, 6)] {
            assert_eq!(
                f.hub.recover(&[c.id], &room, since),
                Some(false),
                "{since:?}"
            );
        }
        assert_eq!(received(&c), vec![], "nothing from history");
        f.hub.send(&to_room, Kind::Text, b"m6");
        assert_eq!(received(&c), vec![(1, b"6:m6".to_vec())], "but subscribed");
        assert_eq!(received(&a), vec![(1, b"6:m6".to_vec())]);
        let kept = f.hub.history(&room, 0, usize::MAX).unwrap();
        assert_eq!(
            kept,
            vec![
                (4, Kind::Text, Bytes::from_static(b"m4")),
                (5, Kind::Binary, Bytes::from_static(b"m5")),
                (6, Kind::Text, Bytes::from_static(b"m6"))
            ],
            "as sent"
        );
        assert_eq!(f.hub.history(&room, 4, 1).unwrap()[0].0, 5);
        // Sockets are never stamped; stamp=false channels are numbered but unchanged.
        f.hub.send(&[Target::Socket(c.id)], Kind::Text, b"direct");
        f.hub.subscribe(&[Target::Socket(c.id)], &ch("plain:1"), 1);
        f.hub
            .send(&[Target::Channel(ch("plain:1"))], Kind::Text, b"as is");
        assert_eq!(
            received(&c),
            vec![(1, b"direct".to_vec()), (1, b"as is".to_vec())]
        );
        assert_eq!(f.hub.position(b"plain:1").unwrap().1, 1);
        assert_eq!(f.hub.position(b"other"), None);
        assert_eq!(f.hub.recover(&[c.id], &ch("other"), (&epoch, 0)), None);
        assert_eq!(
            (f.hub.history_channel_count(), f.hub.history_message_count()),
            (2, 4)
        );
        f.hub.set_history(Policies::default());
        assert_eq!(f.hub.history_channel_count(), 0);
        f.hub.send(&to_room, Kind::Text, b"m7");
        assert_eq!(received(&a), vec![(1, b"m7".to_vec())], "no policy: plain");
    }

    /// Senders that never pause and recovers of fresh virtual sockets at once:
    /// each virtual socket gets every offset after its `since`, once, in order.
    #[test]
    fn recovers_and_sends_meet_without_a_seam() {
        let f = Fixture::new();
        f.hub
            .set_history(Policies::new([(Bytes::new(), policy(1 << 20, true))]));
        let worker = f.workers.pick().unwrap();
        let conn = f.hub.add_socket(|id| Socket::new(id, worker, 1 << 30));
        let room = ch("room");
        let stop = std::sync::atomic::AtomicBool::new(false);
        let mut recovered = Vec::new();
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        // In bursts: the outbox, read only at the end, stays small.
                        for _ in 0..10 {
                            f.hub
                                .send(&[Target::Channel(room.clone())], Kind::Text, b"x");
                        }
                        std::thread::sleep(std::time::Duration::from_micros(50));
                    }
                });
            }
            let stopper = StopOnDrop(&stop);
            let mut alive = VecDeque::new();
            while f.hub.position(&room).unwrap().1 < 100 {
                std::thread::yield_now();
            }
            for i in 0..300u64 {
                let prefix = format!("{i}|");
                let v = f
                    .hub
                    .create_virtual_socket(conn.id, Some(prefix.as_bytes()))
                    .unwrap();
                let (epoch, last) = f.hub.position(&room).unwrap();
                let since = last.saturating_sub(i % 37);
                assert_eq!(f.hub.recover(&[v], &room, (&epoch, since)), Some(true));
                recovered.push((prefix, since, last));
                alive.push_back(v);
                if alive.len() > 4 {
                    let gone = alive.pop_front().unwrap();
                    assert!(f.hub.delete_virtual_socket(gone, Some(conn.id)));
                }
                // Room for sends between two recovers, so each meets live ones.
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
            drop(stopper);
            for v in alive {
                f.hub.delete_virtual_socket(v, Some(conn.id));
            }
        });
        let mut seen: std::collections::HashMap<String, Vec<u64>> = Default::default();
        for frame in taken(&conn) {
            // Small frames: a 2-byte header, then "i|offset:x".
            let text = std::str::from_utf8(&frame[2..]).unwrap();
            let (prefix, rest) = text.split_once('|').unwrap();
            let (offset, _) = rest.split_once(':').unwrap();
            seen.entry(format!("{prefix}|"))
                .or_default()
                .push(offset.parse().unwrap());
        }
        let mut live_after = 0;
        for (prefix, since, last) in recovered {
            let offsets = seen.remove(&prefix).unwrap_or_default();
            assert!(
                offsets.len() as u64 >= last - since,
                "{prefix}: every kept one"
            );
            let expected: Vec<u64> = (since + 1..).take(offsets.len()).collect();
            assert_eq!(offsets, expected, "{prefix} since {since}");
            live_after += usize::from(offsets.last().is_some_and(|&o| o > last));
        }
        assert!(
            live_after > 150,
            "only {live_after} recovers met live sends"
        );
    }

    /// The events queued for `socket`'s worker, as text: `close 7`,
    /// `+room ada` (joined), `-room ada` (left).
    fn worker_events(socket: &Socket) -> Vec<String> {
        socket
            .worker
            .drain()
            .into_iter()
            .map(|e| match &e.payload {
                Payload::Close => format!("close {}", e.socket_id()),
                Payload::Presence(c) => format!(
                    "{}{} {}",
                    if c.joined { '+' } else { '-' },
                    String::from_utf8_lossy(&c.channel),
                    c.member
                ),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn presence_counts_members_once_and_untracks_what_closes_or_is_deleted() {
        let f = Fixture::new();
        let (a, b) = (f.connect(), f.connect());
        let va = f.hub.create_virtual_socket(a.id, None).unwrap();
        let vva = f.hub.create_virtual_socket(va, None).unwrap();
        let text = |s: &str| Some(Info::Text(ch(s)));
        assert_eq!(f.hub.track(a.id, b"room", "ada", text("1")), Ok(true));
        assert_eq!(f.hub.track(b.id, b"room", "ada", text("2")), Ok(false));
        assert_eq!(f.hub.track(va, b"room", "bob", None), Ok(true));
        assert_eq!(f.hub.track(vva, b"room", "cy", None), Ok(true));
        assert_eq!(f.hub.track(vva, b"hall", "cy", None), Ok(true));
        assert_eq!(
            f.hub.track(9999, b"room", "x", None),
            Err(PresenceError::NoSuchSocket)
        );
        assert_eq!(
            (f.hub.presence_count(b"room"), f.hub.presence_member_count()),
            (3, 4)
        );
        assert_eq!(
            worker_events(&a),
            ["+room ada", "+room bob", "+room cy", "+hall cy"],
            "a virtual socket's changes go to its connection's worker"
        );
        // Deleting va deletes vva too: both are untracked.
        assert!(f.hub.delete_virtual_socket(va, None));
        let mut left = worker_events(&a);
        left.sort();
        assert_eq!(left, ["-hall cy", "-room bob", "-room cy"]);
        assert!(!f.hub.untrack(vva, b"room"), "gone, so untracked already");
        let closed = std::cell::Cell::new(false);
        f.hub.remove_socket(a.id, || {
            closed.set(true);
            a.worker.push(&a, Payload::Close, ReadAt::now());
        });
        assert!(closed.get());
        assert_eq!(
            worker_events(&a),
            [format!("close {}", a.id)],
            "b keeps ada"
        );
        assert_eq!(f.hub.presence(b"room"), vec![("ada".into(), text("2"))]);
        let v = f.hub.create_virtual_socket(b.id, None).unwrap();
        assert_eq!(f.hub.track(v, b"room", "dee", None), Ok(true));
        f.hub.remove_socket(b.id, || {
            b.worker.push(&b, Payload::Close, ReadAt::now());
        });
        let events = worker_events(&b);
        assert_eq!(
            events[..2],
            [String::from("+room dee"), format!("close {}", b.id)]
        );
        let mut left = events[2..].to_vec();
        left.sort();
        assert_eq!(left, ["-room ada", "-room dee"], "after the close event");
        assert_eq!(
            (f.hub.presence_count(b"room"), f.hub.presence_member_count()),
            (0, 0)
        );
        assert_eq!(f.hub.presence(b"room"), vec![]);
        let c = f.connect();
        assert!(f.hub.close(c.id, 1000, ""));
        assert_eq!(
            f.hub.track(c.id, b"room", "x", None),
            Err(PresenceError::NoSuchSocket),
            "a closing connection counts as gone"
        );
    }

    /// Tracks, untracks, virtual socket deletes and closes from many threads
    /// at once: the changes reach the (one) worker queue alternating for
    /// every (channel, member), each close event before the changes of its
    /// close, and nothing is left once every socket is gone.
    #[test]
    fn concurrent_presence_changes_stay_in_order_and_leave_nothing_behind() {
        let f = Fixture::new();
        let sockets: Vec<Arc<Socket>> = (0..8).map(|_| f.connect()).collect();
        let queue = sockets[0].worker.clone();
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let (f, sockets, queue) = (&f, &sockets, &queue);
                scope.spawn(move || {
                    let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ t;
                    let mut next = move || {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed
                    };
                    for i in 0..3000 {
                        let socket = &sockets[(next() % 8) as usize];
                        let channel = [b'a' + (next() % 3) as u8];
                        let member = ["x", "y"][(next() % 2) as usize];
                        if t == 0 && i % 500 == 499 {
                            f.hub.remove_socket(socket.id, || {
                                queue.push(socket, Payload::Close, ReadAt::now());
                            });
                            continue;
                        }
                        match next() % 5 {
                            0 | 1 => {
                                let _ = f.hub.track(socket.id, &channel, member, None);
                            }
                            2 => {
                                f.hub.untrack(socket.id, &channel);
                            }
                            3 => {
                                if let Ok(v) = f.hub.create_virtual_socket(socket.id, None) {
                                    let _ = f.hub.track(v, &channel, member, None);
                                    if i % 2 == 0 {
                                        f.hub.delete_virtual_socket(v, None);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                });
            }
        });
        for socket in &sockets {
            f.hub.remove_socket(socket.id, || {
                queue.push(socket, Payload::Close, ReadAt::now());
            });
        }
        assert_eq!(f.hub.presence_member_count(), 0);
        assert_eq!(f.hub.virtual_socket_count(), 0);
        let mut present: std::collections::HashMap<(Bytes, Arc<str>), bool> = Default::default();
        let mut closed = std::collections::HashSet::new();
        for event in queue.drain() {
            let id = event.socket_id();
            match event.payload {
                Payload::Presence(change) => {
                    let was = present
                        .insert(
                            (change.channel.clone(), change.member.clone()),
                            change.joined,
                        )
                        .unwrap_or(false);
                    assert_ne!(was, change.joined, "{change:?} alternates");
                    if !change.joined {
                        continue;
                    }
                    assert!(
                        !closed.contains(&id),
                        "a join through a socket after its close"
                    );
                }
                Payload::Close => {
                    closed.insert(id);
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(present.len() >= 6, "{present:?}");
        // Every socket closed once at the end; those closed mid-run twice.
        assert_eq!(closed.len(), sockets.len());
        assert!(present.values().all(|&p| !p), "every join has its leave");
    }

    #[derive(Default)]
    struct Seen(Mutex<Vec<String>>);

    impl ChannelWatcher for Arc<Seen> {
        fn channel_appeared(&self, name: &Bytes) {
            self.0
                .lock()
                .push(format!("+{}", String::from_utf8_lossy(name)));
        }
        fn channel_vanished(&self, name: &Bytes) {
            self.0
                .lock()
                .push(format!("-{}", String::from_utf8_lossy(name)));
        }
    }

    #[test]
    fn the_watcher_hears_of_channels_appearing_and_vanishing_only() {
        let f = Fixture::new();
        let seen = Arc::new(Seen::default());
        f.hub.set_watcher(Some(Box::new(seen.clone())));
        let (a, b) = (f.connect(), f.connect());
        let v = f.hub.create_virtual_socket(a.id, None).unwrap();
        let both = [Target::Socket(a.id), Target::Socket(b.id)];
        f.hub.subscribe(&both, &ch("x"), 1);
        f.hub.subscribe(&both, &ch("x"), 1);
        f.hub.subscribe(&[Target::Socket(v)], &ch("y"), 1);
        f.hub.subscribe(&[Target::Socket(a.id)], &ch("x"), -2);
        f.hub.subscribe(&[Target::Socket(b.id)], &ch("x"), -2);
        f.hub.subscribe(&[Target::Socket(b.id)], &ch("y"), 1);
        f.hub.remove_socket(a.id, || {});
        assert_eq!(*seen.0.lock(), ["+x", "+y", "-x"]);
        f.hub.remove_socket(b.id, || {});
        f.hub.set_watcher(None);
        f.hub
            .subscribe(&[Target::Socket(f.connect().id)], &ch("z"), 1);
        assert_eq!(*seen.0.lock(), ["+x", "+y", "-x", "-y"]);
    }
}
