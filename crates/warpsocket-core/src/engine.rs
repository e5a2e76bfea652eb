//! The engine: what the binding and the servers call. A thin façade over
//! the [`Hub`] (this process's sockets, channels and upgrades) and, while
//! this process is a node of a cluster, the [`Cluster`] that routes what
//! names another node. [`Engine::route`] is the one place that decides
//! which; the key/value store sits behind [`KvBackend`], so the in-process
//! store is out of reach while Redis holds the cluster's.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use tokio::sync::oneshot;

use crate::cluster::Cluster;
use crate::errors::{JoinError, PresenceError, Unreachable, VirtualError};
use crate::frame::Kind;
use crate::history::{Message, Policies};
use crate::hub::{Hub, Target};
use crate::kv::Kv;
use crate::presence::{Info, Members};
use crate::registry::MAX_PREFIX;
use crate::socket::{Socket, Workers};
use crate::stats::Counters;
use crate::verdict::Verdict;

#[derive(Default)]
pub struct Engine {
    hub: Arc<Hub>,
    /// The store of a process on its own; only [`KvBackend::Local`] reaches it.
    kv: Kv,
    /// Set while this process is a node of a cluster.
    cluster: ArcSwapOption<Cluster>,
}

/// Where the key/value store lives: in this process, or in Redis for a
/// cluster.
enum KvBackend<'a> {
    Local(&'a Kv),
    Redis(&'a Cluster),
}

impl KvBackend<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, Unreachable> {
        match self {
            KvBackend::Local(kv) => Ok(kv.get(key)),
            KvBackend::Redis(cluster) => cluster.get_key(key),
        }
    }

    fn set(&self, key: &[u8], value: Option<&[u8]>) -> Result<Option<Bytes>, Unreachable> {
        match self {
            KvBackend::Local(kv) => Ok(kv.set(key, value)),
            KvBackend::Redis(cluster) => cluster.set_key(key, value),
        }
    }

    fn set_if(
        &self,
        key: &[u8],
        new: Option<&[u8]>,
        check: Option<&[u8]>,
    ) -> Result<bool, Unreachable> {
        match self {
            KvBackend::Local(kv) => Ok(kv.set_if(key, new, check)),
            KvBackend::Redis(cluster) => cluster.set_key_if(key, new, check),
        }
    }

    fn len(&self) -> Result<usize, Unreachable> {
        match self {
            KvBackend::Local(kv) => Ok(kv.len()),
            KvBackend::Redis(cluster) => cluster.key_count(),
        }
    }
}

impl Engine {
    pub fn new() -> Arc<Self> {
        Arc::new(Engine::default())
    }

    /// Runs `alone` on the hub, or, in a cluster, `node` with the cluster
    /// (which applies the local part on the hub and forwards the rest).
    fn route<T>(&self, alone: impl FnOnce(&Hub) -> T, node: impl FnOnce(&Cluster, &Hub) -> T) -> T {
        match self.cluster.load().as_deref() {
            Some(cluster) => node(cluster, &self.hub),
            None => alone(&self.hub),
        }
    }

    fn kv<T>(&self, op: impl Fn(KvBackend<'_>) -> T) -> T {
        self.route(
            |_| op(KvBackend::Local(&self.kv)),
            |cluster, _| op(KvBackend::Redis(cluster)),
        )
    }

    pub fn stats(&self) -> &Counters {
        &self.hub.stats
    }

    // -- cluster membership ----------------------------------------------

    /// Joins the cluster whose Redis server is at `url`; returns this node's
    /// number. Ids handed out from now on carry it.
    pub fn join_cluster(&self, url: &str) -> Result<u16, JoinError> {
        self.leave_cluster();
        let cluster = Cluster::join(&self.hub, url)?;
        let node = cluster.node();
        self.cluster.store(Some(cluster));
        Ok(node)
    }

    /// Leaves the cluster (if in one): back to a process on its own.
    pub fn leave_cluster(&self) {
        if let Some(cluster) = self.cluster.swap(None) {
            cluster.leave(&self.hub);
        }
    }

    /// This node's number, 0 when not in a cluster.
    pub fn node_id(&self) -> u16 {
        self.route(|_| 0, |cluster, _| cluster.node())
    }

    /// In a cluster, whether its Redis connection is up; None outside one.
    pub fn redis_connected(&self) -> Option<bool> {
        self.route(|_| None, |cluster, _| Some(cluster.redis_connected()))
    }

    // -- connections -----------------------------------------------------

    /// Registers a new connection under a fresh id.
    pub(crate) fn add_socket(&self, make: impl FnOnce(u64) -> Socket) -> Arc<Socket> {
        self.hub.add_socket(make)
    }

    /// Forgets a connection: out of every channel and every channel's
    /// presence, its virtual sockets deleted, its pending upgrade dropped.
    /// `closed` queues its close event: see [`Hub::remove_socket`].
    pub(crate) fn remove_socket(&self, id: u64, closed: impl FnOnce()) {
        self.hub.remove_socket(id, closed);
    }

    /// Open connections (accepted or upgrading) on this node.
    pub fn connection_count(&self) -> usize {
        self.hub.connection_count()
    }

    pub fn virtual_socket_count(&self) -> usize {
        self.hub.virtual_socket_count()
    }

    pub fn channel_count(&self) -> usize {
        self.hub.channel_count()
    }

    pub fn subscription_count(&self) -> usize {
        self.hub.subscription_count()
    }

    pub(crate) fn all_connections(&self) -> Vec<Arc<Socket>> {
        self.hub.all_connections()
    }

    /// Calls `f` for every connection, a registry shard locked at a time;
    /// `f` must not call back into the engine.
    pub(crate) fn for_each_connection(&self, f: impl FnMut(&Arc<Socket>)) {
        self.hub.for_each_connection(f);
    }

    /// The open connection with this id, for worker bookkeeping.
    pub fn connection(&self, id: u64) -> Option<Arc<Socket>> {
        self.hub.connection(id)
    }

    // -- docs/api.md#functions ------------------------------------------------

    /// Sends one message to every target (repeats count again). Returns the
    /// number of recipients it was queued for, plus, in a cluster, the
    /// messages handed to Redis for other nodes.
    pub fn send(&self, targets: &[Target], kind: Kind, payload: &[u8]) -> usize {
        self.route(
            |hub| hub.send(targets, kind, payload),
            |cluster, hub| cluster.send(hub, targets, kind, payload),
        )
    }

    /// Starts the close handshake of the connection `id` resolves to; false
    /// when there is none or it is already closing. For another node's
    /// socket: true when the request was handed to Redis.
    pub fn close(&self, id: u64, code: u16, reason: &str) -> bool {
        self.route(
            |hub| hub.close(id, code, reason),
            |cluster, hub| cluster.close(hub, id, code, reason),
        )
    }

    /// Adds `delta` to the subscription count of every socket `targets` names
    /// (a channel target names its current subscribers) on `channel`. Returns
    /// the ids that became subscribed (`delta > 0`) or unsubscribed (`delta < 0`)
    /// on this node (another node's sockets are changed there, unreported).
    pub fn subscribe(&self, targets: &[Target], channel: &Bytes, delta: i64) -> Vec<u64> {
        self.route(
            |hub| hub.subscribe(targets, channel, delta),
            |cluster, hub| cluster.subscribe(hub, targets, channel, delta),
        )
    }

    /// True if a subscriber of `channel` resolves to an open connection; in
    /// a cluster, on any node (another node's answer needs Redis: when it is
    /// unreachable, only this node's subscribers count).
    pub fn has_subscriptions(&self, channel: &[u8]) -> bool {
        self.route(
            |hub| hub.has_subscriptions(channel),
            |cluster, hub| cluster.has_subscriptions(hub, channel),
        )
    }

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
        self.route(
            |hub| hub.create_virtual_socket(target, prefix),
            |cluster, hub| cluster.create_virtual_socket(hub, target, prefix),
        )
    }

    /// Deletes a virtual socket (and those pointing at it), removing it from
    /// every channel. With `expected_target`, only if it points there. For
    /// another node's virtual socket: true when the request was handed to Redis.
    pub fn delete_virtual_socket(&self, id: u64, expected_target: Option<u64>) -> bool {
        self.route(
            |hub| hub.delete_virtual_socket(id, expected_target),
            |cluster, hub| cluster.delete_virtual_socket(hub, id, expected_target),
        )
    }

    // -- docs/api.md#presence ---------------------------------------------------
    //
    // In a cluster, Redis keeps who is present: tracks and untracks still
    // go through the hub (the socket must be this node's), whose presence
    // sink the node installed.

    /// Tracks the socket `target` in `channel` as `member` with `info`;
    /// true if `member` became present (in a cluster: on any node).
    pub fn track(
        &self,
        target: u64,
        channel: &[u8],
        member: &str,
        info: Option<Info>,
    ) -> Result<bool, PresenceError> {
        self.hub.track(target, channel, member, info)
    }

    /// Untracks the socket `target` from `channel`; true if its member left.
    pub fn untrack(&self, target: u64, channel: &[u8]) -> bool {
        self.hub.untrack(target, channel)
    }

    /// The members present in `channel`, with the info of their latest track.
    pub fn presence(&self, channel: &[u8]) -> Result<Members, PresenceError> {
        self.route(
            |hub| Ok(hub.presence(channel)),
            |cluster, _| {
                cluster
                    .presence(channel)
                    .map_err(PresenceError::Unreachable)
            },
        )
    }

    /// How many members are present in `channel`.
    pub fn presence_count(&self, channel: &[u8]) -> Result<usize, PresenceError> {
        self.route(
            |hub| Ok(hub.presence_count(channel)),
            |cluster, _| {
                cluster
                    .presence_count(channel)
                    .map_err(PresenceError::Unreachable)
            },
        )
    }

    /// (channel, member) pairs present through this process's sockets.
    pub fn presence_member_count(&self) -> usize {
        self.hub.presence_member_count()
    }

    // -- docs/api.md#history ----------------------------------------------------
    //
    // In a cluster the history lives in Redis, which sequences every history
    // channel's messages; on its own, the process keeps it.

    /// Sets the history policies (a server's, when it binds; none when it
    /// shuts down). Every channel's history kept here so far is forgotten.
    /// The running server's workers (None once it stopped): a cluster
    /// node reports there what no socket here caused.
    pub(crate) fn set_workers(&self, workers: Option<Arc<Workers>>) {
        self.hub.set_workers(workers);
    }

    pub fn set_history(&self, policies: Policies) {
        self.hub.set_history(policies);
    }

    /// `(epoch, offset of the last message)` of a history channel; None
    /// when no policy covers it.
    pub fn position(&self, channel: &[u8]) -> Result<Option<(Arc<str>, u64)>, Unreachable> {
        self.route(
            |hub| Ok(hub.position(channel)),
            |cluster, hub| cluster.position(hub, channel),
        )
    }

    /// The kept messages `(offset, kind, data)` with an offset above
    /// `since`, oldest first, at most `limit`; None when no policy covers
    /// the channel.
    pub fn history(
        &self,
        channel: &[u8],
        since: u64,
        limit: usize,
    ) -> Result<Option<Vec<Message>>, Unreachable> {
        self.route(
            |hub| Ok(hub.history(channel, since, limit)),
            |cluster, hub| cluster.history(hub, channel, since, limit),
        )
    }

    /// Subscribes `targets` to `channel` and delivers them the messages
    /// kept after `since` (epoch, offset), atomically with live sends;
    /// whether it could (nothing missed). None when no policy covers the
    /// channel.
    pub fn recover(
        &self,
        targets: &[u64],
        channel: &Bytes,
        since: (&str, u64),
    ) -> Result<Option<bool>, Unreachable> {
        self.route(
            |hub| Ok(hub.recover(targets, channel, since)),
            |cluster, hub| cluster.recover(hub, targets, channel, since),
        )
    }

    /// Channels whose history this process keeps.
    pub fn history_channel_count(&self) -> usize {
        self.hub.history_channel_count()
    }

    /// Messages this process keeps, over every history channel.
    pub fn history_message_count(&self) -> usize {
        self.hub.history_message_count()
    }

    /// Returns the memory of expired history (does something at most once a
    /// second, however often called).
    pub(crate) fn sweep_history(&self) {
        self.hub.sweep_history();
    }

    pub fn get_key(&self, key: &[u8]) -> Result<Option<Bytes>, Unreachable> {
        self.kv(|kv| kv.get(key))
    }

    /// Stores `value` (`None` deletes); returns the previous value.
    pub fn set_key(&self, key: &[u8], value: Option<&[u8]>) -> Result<Option<Bytes>, Unreachable> {
        self.kv(|kv| kv.set(key, value))
    }

    /// Compare-and-set, see [`Kv::set_if`].
    pub fn set_key_if(
        &self,
        key: &[u8],
        new: Option<&[u8]>,
        check: Option<&[u8]>,
    ) -> Result<bool, Unreachable> {
        self.kv(|kv| kv.set_if(key, new, check))
    }

    /// Keys in the store (for a cluster, as Redis counts them).
    pub fn key_count(&self) -> Result<usize, Unreachable> {
        self.kv(|kv| kv.len())
    }

    // -- upgrades and worker bookkeeping -------------------------------------

    /// Ends every connection pinned to a retired worker at once: accepted ones
    /// are closed with `code`, upgrades still waiting for `handle_open` are
    /// refused with 500. Returns how many were found.
    pub fn end_worker_connections(&self, worker_id: u32, code: u16, reason: &str) -> usize {
        self.hub.end_worker_connections(worker_id, code, reason)
    }

    /// Delivers `handle_open`'s verdict. False when the upgrade is no longer
    /// waiting (the client left, or the server is stopping).
    pub fn resolve_open(&self, id: u64, verdict: Verdict) -> bool {
        self.hub.resolve_open(id, verdict)
    }

    pub(crate) fn wait_for_verdict(&self, id: u64) -> oneshot::Receiver<Verdict> {
        self.hub.wait_for_verdict(id)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::socket::Workers;

    #[test]
    fn parallel_mixed_operations_end_in_the_serial_state() {
        let workers = Workers::default();
        workers.add().unwrap();
        let engine = Engine::new();
        let sockets: Vec<_> = (0..16)
            .map(|_| {
                let worker = workers.pick().unwrap();
                engine.add_socket(|id| Socket::new(id, worker, 1 << 20))
            })
            .collect();
        let ids: Vec<u64> = sockets.iter().map(|s| s.id).collect();
        engine.set_key(b"n", Some(b"0")).unwrap();
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
                        let current = engine.get_key(b"n").unwrap().unwrap();
                        let n: u64 = std::str::from_utf8(&current).unwrap().parse().unwrap();
                        let next = (n + 1).to_string();
                        let won = engine.set_key_if(b"n", Some(next.as_bytes()), Some(&current));
                        wins += u64::from(won.unwrap());
                        if i % 64 == 0 {
                            // Keep outboxes small.
                            let mut sink = VecDeque::new();
                            for id in &ids {
                                if let Some(s) = engine.connection(*id) {
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
        assert_eq!(
            engine.get_key(b"n").unwrap().unwrap(),
            wins.to_string().as_bytes()
        );
    }
}
