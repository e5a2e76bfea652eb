//! Process-wide state every thread reaches: sockets and virtual sockets,
//! channels, the key/value store, pending upgrades and counters, with the
//! operations of API.md §3 on them. It outlives servers: ids are never reused
//! within a process.
//!
//! Lock order, to stay deadlock-free: a socket's links, then a channel shard,
//! then registry shards, then an outbox. Nothing is held while calling out.
//!
//! In cluster mode the public calls go through [`Cluster`], which applies
//! the local part here (the `*_local` methods) and forwards the rest.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::channels::{Change, Channels};
use crate::cluster::{Cluster, Unreachable};
use crate::frame::{self, Kind};
use crate::kv::Kv;
use crate::registry::{Entry, IdMap, Links, Prefix, Registry, VirtualSocket, MAX_PREFIX};
use crate::socket::{Queued, Socket};
use crate::stats::Counters;

/// Below this many outstanding events a paused connection resumes reading.
pub(crate) const RESUME_READING_BELOW: u32 = 32;
/// At this many outstanding events a connection stops being read.
pub(crate) const PAUSE_READING_AT: u32 = 64;

/// `handle_open`'s answer: accept, or the HTTP status to refuse with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Refuse(u16),
}

/// One element of a send or subscribe target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Socket(u64),
    Channel(Bytes),
}

/// Why a virtual socket could not be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VirtualError {
    /// The target is not an open connection or live virtual socket.
    NoSuchSocket,
    PrefixTooLong,
    /// The target lives on another node, which did not answer.
    Unreachable(String),
}

#[derive(Default)]
pub struct Engine {
    pub(crate) sockets: Registry,
    channels: Channels,
    pub kv: Kv,
    /// Upgrades waiting for `handle_open`. Touched twice per connection, never
    /// per message, so one mutex is enough.
    opens: Mutex<IdMap<oneshot::Sender<Verdict>>>,
    pub stats: Counters,
    last_id: AtomicU64,
    connections: AtomicUsize,
    virtual_sockets: AtomicUsize,
    /// Set while this process is a node of a cluster.
    cluster: ArcSwapOption<Cluster>,
    /// The node number in the top bits of every id handed out (0 alone).
    id_base: AtomicU64,
}

impl Engine {
    pub fn new() -> Arc<Self> {
        Arc::new(Engine::default())
    }

    fn next_id(&self) -> u64 {
        self.id_base.load(Ordering::Relaxed) | (self.last_id.fetch_add(1, Ordering::Relaxed) + 1)
    }

    // -- cluster membership ----------------------------------------------

    /// Joins the cluster whose Redis server is at `url`; returns this node's
    /// number. Ids handed out from now on carry it.
    pub fn join_cluster(self: &Arc<Self>, url: &str) -> io::Result<u16> {
        self.leave_cluster();
        let cluster = Cluster::join(self, url)?;
        let node = cluster.node();
        self.id_base.store(cluster.id_base(), Ordering::Relaxed);
        self.cluster.store(Some(cluster));
        Ok(node)
    }

    /// Leaves the cluster (if in one): back to a process on its own.
    pub fn leave_cluster(&self) {
        if let Some(cluster) = self.cluster.swap(None) {
            cluster.leave();
        }
        self.id_base.store(0, Ordering::Relaxed);
    }

    /// This node's number, 0 when not in a cluster.
    pub fn node_id(&self) -> u16 {
        self.cluster.load().as_ref().map_or(0, |c| c.node())
    }

    /// Channels with local subscriptions: the ones to listen to on Redis.
    pub(crate) fn local_channels(&self) -> Vec<Bytes> {
        self.channels.names()
    }

    pub(crate) fn listens_to(&self, channel: &[u8]) -> bool {
        self.channels.contains(channel)
    }

    fn subscriptions_changed(&self, channel: &Bytes) {
        if let Some(cluster) = self.cluster.load().as_ref() {
            cluster.subscriptions_changed(channel);
        }
    }

    // -- connections -----------------------------------------------------

    /// Registers a new connection under a fresh id.
    pub(crate) fn add_socket(&self, make: impl FnOnce(u64) -> Socket) -> Arc<Socket> {
        let socket = Arc::new(make(self.next_id()));
        self.sockets.insert(socket.id, Entry::Real(socket.clone()));
        self.connections.fetch_add(1, Ordering::Relaxed);
        socket
    }

    /// Forgets a connection: out of every channel, its virtual sockets
    /// deleted, its pending upgrade dropped. O(its subscriptions).
    pub(crate) fn remove_socket(&self, id: u64) {
        self.opens.lock().remove(&id);
        if self.delete(id) {
            self.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Deletes `id` and, transitively, the virtual sockets pointing at it.
    fn delete(&self, id: u64) -> bool {
        let Some(entry) = self.sockets.remove(id) else {
            return false;
        };
        let mut pending = vec![(id, entry)];
        while let Some((id, entry)) = pending.pop() {
            let (channels, children) = entry.links().lock().kill();
            for channel in &channels {
                self.channels.update(channel, id, i64::MIN);
                self.subscriptions_changed(channel);
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
        true
    }

    /// Open connections (accepted or upgrading).
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn virtual_socket_count(&self) -> usize {
        self.virtual_sockets.load(Ordering::Relaxed)
    }

    pub fn channel_count(&self) -> usize {
        self.channels.channel_count()
    }

    pub fn subscription_count(&self) -> usize {
        self.channels.pair_count()
    }

    pub(crate) fn all_connections(&self) -> Vec<Arc<Socket>> {
        self.sockets.connections()
    }

    // -- sending -----------------------------------------------------------

    /// Sends one message to every target (repeats count again). Returns the
    /// number of recipients it was queued for, plus, in a cluster, the
    /// messages handed to Redis for other nodes.
    pub fn send(&self, targets: &[Target], kind: Kind, payload: &[u8]) -> usize {
        match self.cluster.load().as_ref() {
            Some(cluster) => cluster.send(self, targets, kind, payload),
            None => self.send_local(targets, kind, payload),
        }
    }

    /// [`send`](Self::send) on this node only: the frame is encoded once and
    /// shared, except for prefixed virtual sockets.
    pub(crate) fn send_local(&self, targets: &[Target], kind: Kind, payload: &[u8]) -> usize {
        let frame = frame::encode_message(kind, payload);
        let mut sent = 0;
        let mut overflowed = Vec::new();
        let mut deliver = |id: u64| match self.deliver(id, &frame, kind, payload) {
            (_, Queued::Yes) => true,
            (socket, Queued::Overflow) => {
                overflowed.push(socket);
                false
            }
            (_, Queued::No) => false,
        };
        for target in targets {
            match target {
                Target::Socket(id) => sent += usize::from(deliver(*id)),
                Target::Channel(name) => {
                    let view = self.channels.subscribers(name);
                    sent += view.ids().filter(|&id| deliver(id)).count();
                }
            }
        }
        Counters::add(&self.stats.messages_out, sent as u64);
        Counters::add(&self.stats.bytes_out, (sent * payload.len()) as u64);
        // Logged after every lock is released: the log may call into Python.
        for socket in overflowed {
            Counters::add(&self.stats.backpressure_closes, 1);
            log::warn!(target: "warpsocket", "socket {socket}: closed with 1008, outgoing backpressure limit exceeded");
        }
        sent
    }

    /// Queues the message for the connection `id` resolves to; returns that
    /// connection's id and the outcome.
    fn deliver(&self, id: u64, frame: &Bytes, kind: Kind, payload: &[u8]) -> (u64, Queued) {
        let Some((socket, prefix)) = self.sockets.resolve(id) else {
            return (id, Queued::No);
        };
        let queued = match prefix {
            None => socket.send(frame),
            Some(prefix) => socket.send(&prefixed_frame(kind, &prefix, payload)),
        };
        (socket.id, queued)
    }

    /// Starts the close handshake of the connection `id` resolves to; false
    /// when there is none or it is already closing. For another node's
    /// socket: true when the request was handed to Redis.
    pub fn close(&self, id: u64, code: u16, reason: &str) -> bool {
        if let Some(cluster) = self.cluster.load().as_ref() {
            if let Some(forwarded) = cluster.close(self, id, code, reason) {
                return forwarded;
            }
        }
        self.close_local(id, code, reason)
    }

    pub(crate) fn close_local(&self, id: u64, code: u16, reason: &str) -> bool {
        self.sockets
            .resolve(id)
            .is_some_and(|(socket, _)| socket.close(code, reason))
    }

    // -- channels ------------------------------------------------------------

    /// Adds `delta` to the subscription count of every socket `targets` names
    /// (a channel target names its current subscribers) on `channel`. Returns
    /// the ids that became subscribed (`delta > 0`) or unsubscribed (`delta < 0`)
    /// on this node (another node's sockets are changed there, unreported).
    pub fn subscribe(&self, targets: &[Target], channel: &Bytes, delta: i64) -> Vec<u64> {
        match self.cluster.load().as_ref() {
            Some(cluster) => cluster.subscribe(self, targets, channel, delta),
            None => self.subscribe_local(targets, channel, delta),
        }
    }

    pub(crate) fn subscribe_local(
        &self,
        targets: &[Target],
        channel: &Bytes,
        delta: i64,
    ) -> Vec<u64> {
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
        let Some(entry) = self.sockets.get(id) else {
            return false;
        };
        if !self.resolves_open(id) {
            return false;
        }
        // Holding the links while the channel changes keeps the two indexes in
        // step with a concurrent delete, which marks the links dead first.
        let mut links = entry.links().lock();
        if links.dead {
            return false;
        }
        match self.channels.update(channel, id, delta) {
            // The name as the channel stores it: every subscriber's links
            // share one allocation of it.
            Change::Added(name) => links.add_channel(name),
            Change::Removed => links.remove_channel(channel),
            Change::Kept => return false,
        }
        drop(links);
        self.subscriptions_changed(channel);
        true
    }

    /// True if a subscriber of `channel` resolves to an open connection; in
    /// a cluster, on any node (another node's answer needs Redis: when it is
    /// unreachable, only this node's subscribers count).
    pub fn has_subscriptions(&self, channel: &[u8]) -> bool {
        if self.has_local_subscriptions(channel) {
            return true;
        }
        match self.cluster.load().as_ref() {
            Some(cluster) => cluster.others_subscribed(self, channel).unwrap_or(false),
            None => false,
        }
    }

    fn has_local_subscriptions(&self, channel: &[u8]) -> bool {
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

    // -- virtual sockets -----------------------------------------------------

    /// Creates a virtual socket pointing at `target` (a connection or another
    /// virtual socket). In a cluster it is made by the node that owns
    /// `target`, which this waits for.
    pub fn create_virtual_socket(
        &self,
        target: u64,
        prefix: Option<&[u8]>,
    ) -> Result<u64, VirtualError> {
        if prefix.is_some_and(|p| p.len() > MAX_PREFIX) {
            return Err(VirtualError::PrefixTooLong);
        }
        if let Some(cluster) = self.cluster.load().as_ref() {
            if let Some(made) =
                cluster.create_virtual_socket(self, target, prefix.unwrap_or_default())
            {
                return made;
            }
        }
        self.create_virtual_socket_local(target, prefix)
    }

    pub(crate) fn create_virtual_socket_local(
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
        let id = self.next_id();
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
            self.delete(id);
            return Err(VirtualError::NoSuchSocket);
        }
        links.add_child(id);
        Ok(id)
    }

    /// Deletes a virtual socket (and those pointing at it), removing it from
    /// every channel. With `expected_target`, only if it points there. For
    /// another node's virtual socket: true when the request was handed to Redis.
    pub fn delete_virtual_socket(&self, id: u64, expected_target: Option<u64>) -> bool {
        if let Some(cluster) = self.cluster.load().as_ref() {
            if let Some(forwarded) = cluster.delete_virtual_socket(self, id, expected_target) {
                return forwarded;
            }
        }
        self.delete_virtual_socket_local(id, expected_target)
    }

    pub(crate) fn delete_virtual_socket_local(
        &self,
        id: u64,
        expected_target: Option<u64>,
    ) -> bool {
        let Some(Entry::Virtual(v)) = self.sockets.get(id) else {
            return false;
        };
        if expected_target.is_some_and(|t| t != v.target) {
            return false;
        }
        if !self.delete(id) {
            return false;
        }
        if let Some(parent) = self.sockets.get(v.target) {
            parent.links().lock().remove_child(id);
        }
        true
    }

    // -- the key/value store: in-process, or in Redis for a cluster ----------

    pub fn get_key(&self, key: &[u8]) -> Result<Option<Bytes>, Unreachable> {
        match self.cluster.load().as_ref() {
            Some(cluster) => cluster.get_key(key),
            None => Ok(self.kv.get(key)),
        }
    }

    /// Stores `value` (`None` deletes); returns the previous value.
    pub fn set_key(&self, key: &[u8], value: Option<&[u8]>) -> Result<Option<Bytes>, Unreachable> {
        match self.cluster.load().as_ref() {
            Some(cluster) => cluster.set_key(key, value),
            None => Ok(self.kv.set(key, value)),
        }
    }

    /// Compare-and-set, see [`Kv::set_if`].
    pub fn set_key_if(
        &self,
        key: &[u8],
        new: Option<&[u8]>,
        check: Option<&[u8]>,
    ) -> Result<bool, Unreachable> {
        match self.cluster.load().as_ref() {
            Some(cluster) => cluster.set_key_if(key, new, check),
            None => Ok(self.kv.set_if(key, new, check)),
        }
    }

    /// Keys in the store (for a cluster, as Redis counts them).
    pub fn key_count(&self) -> Result<usize, Unreachable> {
        match self.cluster.load().as_ref() {
            Some(cluster) => cluster.key_count(),
            None => Ok(self.kv.len()),
        }
    }

    // -- upgrades and worker bookkeeping -------------------------------------

    /// Ends every connection pinned to a retired worker at once: accepted ones
    /// are closed with `code`, upgrades still waiting for `handle_open` are
    /// refused with 500. Returns how many were found. Scans all connections;
    /// it runs only when a worker is retired.
    pub fn end_worker_connections(&self, worker_id: u32, code: u16, reason: &str) -> usize {
        let mine: Vec<Arc<Socket>> = self
            .sockets
            .connections()
            .into_iter()
            .filter(|s| s.worker.id() == worker_id)
            .collect();
        for socket in &mine {
            if socket.is_accepted() {
                socket.close(code, reason);
            } else if let Some(waiting) = self.opens.lock().remove(&socket.id) {
                let _ = waiting.send(Verdict::Refuse(500));
            }
        }
        mine.len()
    }

    /// Delivers `handle_open`'s verdict. False when the upgrade is no longer
    /// waiting (the client left, or the server is stopping).
    pub fn resolve_open(&self, id: u64, verdict: Verdict) -> bool {
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

    /// The open connection with this id, for worker bookkeeping.
    pub fn connection(&self, id: u64) -> Option<Arc<Socket>> {
        match self.sockets.get(id) {
            Some(Entry::Real(socket)) => Some(socket),
            _ => None,
        }
    }
}

/// A prefixed copy of a message. Text stays text only when the prefix is
/// valid UTF-8, so no client ever receives invalid text.
fn prefixed_frame(kind: Kind, prefix: &[u8], payload: &[u8]) -> Bytes {
    let kind = match kind {
        Kind::Text if std::str::from_utf8(prefix).is_err() => Kind::Binary,
        kind => kind,
    };
    frame::encode_prefixed(kind, prefix, payload)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::dispatch::Workers;

    struct Fixture {
        engine: Arc<Engine>,
        workers: Workers,
    }

    impl Fixture {
        fn new() -> Self {
            let workers = Workers::default();
            workers.add().unwrap();
            Fixture {
                engine: Engine::new(),
                workers,
            }
        }

        fn connect(&self) -> Arc<Socket> {
            let worker = self.workers.pick().unwrap();
            self.engine
                .add_socket(|id| Socket::new(id, worker, 1 << 20))
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
        assert_eq!(f.engine.send(&targets, Kind::Text, b"hi"), 3);
        assert_eq!(received(&a), vec![(1, b"hi".to_vec()), (1, b"hi".to_vec())]);
        assert_eq!(received(&b), vec![(1, b"hi".to_vec())]);
    }

    #[test]
    fn backpressure_counts_what_waits_not_one_large_message() {
        let f = Fixture::new();
        let worker = f.workers.pick().unwrap();
        let small = f.engine.add_socket(|id| Socket::new(id, worker, 100));
        let target = [Target::Socket(small.id)];
        assert_eq!(
            f.engine.send(&target, Kind::Binary, &[0; 150]),
            1,
            "alone in the queue: sent"
        );
        assert_eq!(
            f.engine.send(&target, Kind::Binary, &[0; 1]),
            0,
            "behind it: over the limit"
        );
        assert_eq!(Counters::get(&f.engine.stats.backpressure_closes), 1);
        assert!(
            !f.engine.close(small.id, 1000, ""),
            "already closing with 1008"
        );
    }

    #[test]
    fn channel_subscriptions_are_reference_counted() {
        let f = Fixture::new();
        let (a, b) = (f.connect(), f.connect());
        let room = ch("room");
        let both = [Target::Socket(a.id), Target::Socket(b.id)];
        assert_eq!(f.engine.subscribe(&both, &room, 1), vec![a.id, b.id]);
        assert_eq!(
            f.engine.subscribe(&[Target::Socket(a.id)], &room, 1),
            vec![]
        );
        assert_eq!(
            f.engine
                .send(&[Target::Channel(room.clone())], Kind::Binary, b"x"),
            2
        );
        assert_eq!(f.engine.subscribe(&both, &room, -1), vec![b.id]);
        assert!(f.engine.has_subscriptions(&room));
        assert_eq!(f.engine.subscribe(&both, &room, -1), vec![a.id]);
        assert!(!f.engine.has_subscriptions(&room));
        assert_eq!(
            (f.engine.channel_count(), f.engine.subscription_count()),
            (0, 0)
        );
        assert_eq!(f.engine.subscribe(&both, &room, 0), vec![]);
        assert_eq!(
            f.engine.subscribe(&[Target::Socket(12345)], &room, 1),
            vec![]
        );
    }

    #[test]
    fn channel_to_channel_subscribe_applies_delta_to_each_subscriber() {
        let f = Fixture::new();
        let (a, b) = (f.connect(), f.connect());
        let (src, dst) = (ch("src"), ch("dst"));
        f.engine
            .subscribe(&[Target::Socket(a.id), Target::Socket(b.id)], &src, 1);
        f.engine.subscribe(&[Target::Socket(a.id)], &dst, 1);
        assert_eq!(
            f.engine.subscribe(&[Target::Channel(src.clone())], &dst, 1),
            vec![b.id]
        );
        assert_eq!(
            f.engine
                .subscribe(&[Target::Channel(src.clone())], &dst, -1),
            vec![b.id]
        );
        assert_eq!(
            f.engine.subscribe(&[Target::Channel(src)], &dst, -1),
            vec![a.id]
        );
    }

    #[test]
    fn virtual_sockets_prefix_and_chain() {
        let f = Fixture::new();
        let a = f.connect();
        let v1 = f.engine.create_virtual_socket(a.id, Some(b"r1:")).unwrap();
        let v2 = f.engine.create_virtual_socket(v1, None).unwrap();
        let v3 = f.engine.create_virtual_socket(v2, Some(b"r3:")).unwrap();
        let bad = f.engine.create_virtual_socket(a.id, Some(&[0xff])).unwrap();
        assert_eq!(
            f.engine.create_virtual_socket(a.id, Some(&[b'x'; 16])),
            Err(VirtualError::PrefixTooLong)
        );
        assert_eq!(
            f.engine.create_virtual_socket(9999, None),
            Err(VirtualError::NoSuchSocket)
        );
        for id in [v1, v2, v3, bad] {
            assert_eq!(f.engine.send(&[Target::Socket(id)], Kind::Text, b"m"), 1);
        }
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
        let v = f.engine.create_virtual_socket(a.id, Some(b"v:")).unwrap();
        let room = ch("room");
        f.engine
            .subscribe(&[Target::Socket(a.id), Target::Socket(v)], &room, 1);
        assert_eq!(
            f.engine
                .send(&[Target::Channel(room.clone())], Kind::Text, b"x"),
            2
        );
        let mut got = received(&a);
        got.sort();
        assert_eq!(got, vec![(1, b"v:x".to_vec()), (1, b"x".to_vec())]);
        assert_eq!(f.engine.subscription_count(), 2);
    }

    #[test]
    fn deleting_a_virtual_socket_cascades_and_leaves_channels() {
        let f = Fixture::new();
        let a = f.connect();
        let v1 = f.engine.create_virtual_socket(a.id, None).unwrap();
        let v2 = f.engine.create_virtual_socket(v1, None).unwrap();
        let room = ch("room");
        f.engine
            .subscribe(&[Target::Socket(v1), Target::Socket(v2)], &room, 1);
        assert!(!f.engine.delete_virtual_socket(v1, Some(a.id + 1000)));
        assert!(f.engine.delete_virtual_socket(v1, Some(a.id)));
        assert!(!f.engine.delete_virtual_socket(v1, None));
        assert_eq!(f.engine.send(&[Target::Socket(v2)], Kind::Text, b"x"), 0);
        assert_eq!(
            (
                f.engine.virtual_socket_count(),
                f.engine.subscription_count()
            ),
            (0, 0)
        );
        assert!(
            !f.engine.delete_virtual_socket(a.id, None),
            "not a virtual socket"
        );
    }

    #[test]
    fn closing_a_connection_cleans_up_everything_it_had() {
        let f = Fixture::new();
        let (a, b) = (f.connect(), f.connect());
        let v = f.engine.create_virtual_socket(a.id, Some(b"p")).unwrap();
        for name in ["x", "y", "z"] {
            f.engine.subscribe(
                &[
                    Target::Socket(a.id),
                    Target::Socket(v),
                    Target::Socket(b.id),
                ],
                &ch(name),
                1,
            );
        }
        f.engine.remove_socket(a.id);
        assert_eq!(f.engine.connection_count(), 1);
        assert_eq!(f.engine.virtual_socket_count(), 0);
        assert_eq!(f.engine.subscription_count(), 3);
        assert_eq!(
            f.engine.send(
                &[Target::Socket(v), Target::Channel(ch("x"))],
                Kind::Text,
                b"m"
            ),
            1
        );
        assert!(!f.engine.close(a.id, 1000, ""));
        assert!(f.engine.close(b.id, 1000, ""));
        assert!(!f.engine.close(b.id, 1000, ""), "already closing");
        assert!(
            !f.engine.has_subscriptions(b"x"),
            "a closing connection counts as gone"
        );
        assert_eq!(
            f.engine.create_virtual_socket(b.id, None),
            Err(VirtualError::NoSuchSocket)
        );
        assert_eq!(
            f.engine.subscribe(&[Target::Socket(b.id)], &ch("w"), 1),
            vec![]
        );
    }

    #[test]
    fn parallel_mixed_operations_end_in_the_serial_state() {
        let f = Fixture::new();
        let sockets: Vec<_> = (0..16).map(|_| f.connect()).collect();
        let ids: Vec<u64> = sockets.iter().map(|s| s.id).collect();
        let engine = f.engine.clone();
        engine.kv.set(b"n", Some(b"0"));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let engine = engine.clone();
                let ids = ids.clone();
                std::thread::spawn(move || {
                    let mut wins = 0u64;
                    for i in 0..12_500usize {
                        let id = ids[(i + t) % ids.len()];
                        let name = Bytes::from(format!("c{}", i % 7));
                        engine.subscribe(&[Target::Socket(id)], &name, 1);
                        engine.send(&[Target::Channel(name.clone())], Kind::Text, b"");
                        engine.subscribe(&[Target::Socket(id)], &name, -1);
                        let current = engine.kv.get(b"n").unwrap();
                        let n: u64 = std::str::from_utf8(&current).unwrap().parse().unwrap();
                        wins += u64::from(engine.kv.set_if(
                            b"n",
                            Some((n + 1).to_string().as_bytes()),
                            Some(&current),
                        ));
                        if i % 64 == 0 {
                            // Keep outboxes small.
                            let mut sink = VecDeque::new();
                            for id in &ids {
                                if let Some(Entry::Real(s)) = engine.sockets.get(*id) {
                                    s.take(&mut sink, false);
                                    s.written(usize::MAX);
                                }
                                sink.clear();
                            }
                        }
                    }
                    wins
                })
            })
            .collect();
        let wins: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(
            (engine.channel_count(), engine.subscription_count()),
            (0, 0)
        );
        assert_eq!(engine.kv.get(b"n").unwrap(), wins.to_string().as_bytes());
    }
}
