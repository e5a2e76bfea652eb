//! Cluster mode (docs/api.md#cluster): this process is one node of many that share a
//! Redis server. Local traffic never touches Redis; what names another node
//! goes through Redis pub/sub, and the key/value store lives in Redis.
//!
//! - Ids: every node gets a number from Redis at join time and puts it in the
//!   top bits of the ids it hands out, so the owner of any id is known
//!   without asking anyone.
//! - Channels: a node subscribes to a channel's Redis channel only while it
//!   has local subscribers; a broadcast is delivered locally and published
//!   once for the other nodes.
//! - Everything else naming another node's socket is forwarded to that
//!   node's own Redis channel and applied there.
//!
//! Two background tasks on a small runtime of its own do the Redis I/O
//! (`conn.rs`, shared with [`Client`], and `link.rs`); the calls here never wait for Redis except where the API
//! returns what only Redis knows (kv, `has_subscriptions`, a virtual socket
//! created for another node's socket).
//!
//! Uses the hub (for the local part of every call, and to learn which
//! channels appear or vanish here) and the leaves; never the engine, which
//! sits above it and decides when a call goes through here.
//!
//! [`Client`] (`client.rs`) is the same cluster seen from a process that is
//! no node (docs/api.md#cluster-client): it shares `conn.rs` with the node.

mod client;
mod conn;
mod kept;
mod link;
mod presence;
mod relay;
mod wire;

pub use client::Client;

#[doc(hidden)]
pub use wire::reencode_message;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::errors::{JoinError, Unreachable, VirtualError};
use crate::frame::Kind;
use crate::history::{Message, Policy};
use crate::hub::{ChannelWatcher, Hub, Target};
use crate::ids::owner;
use crate::presence::Members;
use crate::stats::Counters;
use conn::{Conn, Outgoing, REDIS_TIMEOUT};
use kept::Read;
use link::Interest;
use relay::Relays;
use wire::{node_key, pubsub_key, Op};

pub struct Cluster {
    node: u16,
    /// The command connection, the publisher and the runtime; its `up` is
    /// the listener's pub/sub connection.
    conn: Conn,
    /// To the listener, for a recover that must know the node listens.
    interest: mpsc::UnboundedSender<Interest>,
    /// History channels' in-order delivery here, shared with the listener.
    relays: Arc<Relays>,
    requests: Mutex<HashMap<u64, oneshot::Sender<Option<u64>>>>,
    next_request: AtomicU64,
    /// To the presence task, for the last step of a leave.
    presence: mpsc::Sender<presence::Op>,
}

/// Channels that appeared or vanished locally go to the listener task,
/// which checks whether this node should (still) listen to them on Redis.
struct Watcher(mpsc::UnboundedSender<Interest>);

impl ChannelWatcher for Watcher {
    fn channel_appeared(&self, name: &Bytes) {
        let _ = self.0.send(Interest::Changed(name.clone()));
    }

    fn channel_vanished(&self, name: &Bytes) {
        let _ = self.0.send(Interest::Changed(name.clone()));
    }
}

impl Cluster {
    /// Connects to Redis at `url`, takes a node number and starts listening;
    /// from then on the hub's new ids carry the node number. Fails when
    /// Redis cannot be reached now, or does not take the node's pub/sub
    /// subscriptions in time (the Redis tasks are stopped again then).
    pub(crate) fn join(hub: &Arc<Hub>, url: &str) -> Result<Arc<Cluster>, JoinError> {
        let failures = hub.clone();
        let on_failure = Box::new(move |n| Counters::add(&failures.stats.cluster_send_failures, n));
        let (conn, client) = Conn::open(
            url,
            "warpsocket-redis",
            "the node has left the cluster",
            on_failure,
        )?;
        let unreachable = |why: String| JoinError::Unreachable {
            url: url.to_owned(),
            why,
        };
        let mut commands = conn.commands.clone();
        let node = match conn.wait(link::node_number_from(&mut commands)) {
            Ok(node) => node,
            Err(e) => {
                conn.close();
                return Err(unreachable(e.0));
            }
        };
        let (interest, interest_rx) = mpsc::unbounded_channel();
        let relays = Arc::new(Relays::default());
        let handle = conn.handle.clone();
        let stop_rx = conn.stop_signal();
        let listener = link::Listener {
            node,
            commands: conn.commands.clone(),
            up: conn.up.clone(),
            relays: relays.clone(),
        };
        let (tracker, presence) =
            presence::install(hub.clone(), node, conn.commands.clone(), conn.up.clone());
        handle.spawn(presence::run(tracker, conn.stop_signal()));
        let cluster = Arc::new(Cluster {
            node,
            conn,
            interest: interest.clone(),
            relays,
            requests: Mutex::default(),
            next_request: AtomicU64::new(1),
            presence,
        });
        // Watched before the listener takes its first snapshot of the
        // channels, so that no change falls between the two.
        hub.set_watcher(Some(Box::new(Watcher(interest))));
        hub.set_node(node);
        let (ready, subscribed) = oneshot::channel();
        let applier = cluster.clone();
        handle.spawn(link::listen(
            hub.clone(),
            listener,
            move |hub: &Arc<Hub>, op: Op<'_>| applier.apply(hub, op),
            client,
            interest_rx,
            stop_rx,
            ready,
        ));
        // Serving before the node listens would lose the first messages for
        // it: a node that cannot subscribe in time has not joined.
        let listening =
            handle.block_on(async { tokio::time::timeout(REDIS_TIMEOUT, subscribed).await });
        if !matches!(listening, Ok(Ok(()))) {
            cluster.leave(hub);
            return Err(unreachable(format!(
                "node {node} did not get its pub/sub subscriptions within {REDIS_TIMEOUT:?}"
            )));
        }
        Ok(cluster)
    }

    /// Stops the Redis tasks and closes their connections; the hub's ids no
    /// longer carry the node number.
    pub(crate) fn leave(&self, hub: &Hub) {
        presence::depart(hub, &self.presence, &self.conn.handle);
        self.conn.close();
        hub.set_watcher(None);
        hub.set_node(0);
    }

    pub fn node(&self) -> u16 {
        self.node
    }

    /// True while the pub/sub connection to Redis is up.
    pub fn redis_connected(&self) -> bool {
        self.conn.is_up()
    }

    fn is_remote(&self, id: u64) -> bool {
        let owner = owner(id);
        owner != 0 && owner != self.node
    }

    /// Hands one message to the publisher; 1 when it was, 0 (and a failure
    /// counted) when Redis is down or the queue is full.
    fn publish(&self, hub: &Hub, channel: Bytes, message: Bytes) -> usize {
        count(hub, self.conn.queue(Outgoing::Publish { channel, message }))
    }

    fn forward(&self, hub: &Hub, id: u64, op: &Op<'_>) -> bool {
        count(hub, self.conn.forward(id, op)) == 1
    }

    // -- the engine's calls, routed: the local part on the hub --------------

    pub(crate) fn send(&self, hub: &Hub, targets: &[Target], kind: Kind, payload: &[u8]) -> usize {
        let mut sent = 0;
        let mut local = Vec::with_capacity(targets.len());
        for target in targets {
            match target {
                Target::Socket(id) if self.is_remote(*id) => {
                    let op = Op::Send {
                        id: *id,
                        kind,
                        payload,
                    };
                    sent += usize::from(self.forward(hub, *id, &op));
                }
                Target::Channel(name) => {
                    if let Some(policy) = hub.history_policy(name) {
                        // Delivered here too only once Redis has sequenced
                        // it: see `relay`.
                        let kept = self.conn.send_kept(name.clone(), policy, kind, payload);
                        if count(hub, kept) == 1 {
                            sent += 1 + hub.subscriber_count(name);
                        }
                        continue;
                    }
                    let published = self.conn.broadcast(self.node, name, kind, payload);
                    sent += count(hub, published);
                    local.push(target.clone());
                }
                Target::Socket(_) => local.push(target.clone()),
            }
        }
        sent + hub.send(&local, kind, payload)
    }

    pub(crate) fn subscribe(
        &self,
        hub: &Hub,
        targets: &[Target],
        channel: &Bytes,
        delta: i64,
    ) -> Vec<u64> {
        let mut local = Vec::with_capacity(targets.len());
        let mut remote = Vec::new();
        for target in targets {
            match target {
                Target::Socket(id) if self.is_remote(*id) => remote.push(*id),
                Target::Channel(source) => {
                    count(
                        hub,
                        self.conn
                            .subscribe_channel(self.node, source, channel, delta),
                    );
                    local.push(target.clone());
                }
                Target::Socket(_) => local.push(target.clone()),
            }
        }
        self.conn
            .forward_subscribe(remote, channel, delta, |handed| {
                count(hub, handed);
            });
        hub.subscribe(&local, channel, delta)
    }

    /// Local subscribers first; another node's answer needs Redis, and when
    /// it is unreachable only this node's subscribers count.
    pub(crate) fn has_subscriptions(&self, hub: &Hub, channel: &[u8]) -> bool {
        hub.has_subscriptions(channel) || self.others_subscribed(hub, channel).unwrap_or(false)
    }

    /// Whether another node has subscribers for `channel`: the number of
    /// nodes listening on it, less this one.
    fn others_subscribed(&self, hub: &Hub, channel: &[u8]) -> Result<bool, Unreachable> {
        // Without the pub/sub connection the answer would be stale by the
        // time the node listens again: `listeners` fails at once then.
        let key = pubsub_key(channel, hub.history_policy(channel).is_some());
        let nodes = self.conn.listeners(&key)?;
        let me = u64::from(hub.has_channel(channel));
        Ok(nodes > me)
    }

    pub(crate) fn close(&self, hub: &Hub, id: u64, code: u16, reason: &str) -> bool {
        if !self.is_remote(id) {
            return hub.close(id, code, reason);
        }
        let op = Op::Close {
            id,
            code,
            reason: reason.as_bytes(),
        };
        self.forward(hub, id, &op)
    }

    pub(crate) fn delete_virtual_socket(&self, hub: &Hub, id: u64, expected: Option<u64>) -> bool {
        if !self.is_remote(id) {
            return hub.delete_virtual_socket(id, expected);
        }
        self.forward(hub, id, &Op::DeleteVirtual { id, expected })
    }

    /// A virtual socket for another node's socket is made by that node (it
    /// lives where its connection does); this waits for its answer.
    pub(crate) fn create_virtual_socket(
        &self,
        hub: &Hub,
        target: u64,
        prefix: Option<&[u8]>,
    ) -> Result<u64, VirtualError> {
        if !self.is_remote(target) {
            return hub.create_virtual_socket(target, prefix);
        }
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.requests.lock().insert(request, tx);
        let op = Op::CreateVirtual {
            reply_to: self.node,
            request,
            target,
            prefix: prefix.unwrap_or_default(),
        };
        let answer = if self.forward(hub, target, &op) {
            self.conn.wait(async move {
                rx.await
                    .map_err(|_| redis::RedisError::from(io::Error::other("no answer")))
            })
        } else {
            Err(Unreachable("not connected".into()))
        };
        self.requests.lock().remove(&request);
        match answer {
            Ok(Some(id)) => Ok(id),
            Ok(None) => Err(VirtualError::NoSuchSocket),
            Err(e) => Err(VirtualError::Unreachable(e.0)),
        }
    }

    fn answer(&self, request: u64, id: Option<u64>) {
        if let Some(waiting) = self.requests.lock().remove(&request) {
            let _ = waiting.send(id);
        }
    }

    /// Applies a request from another node. Runs on the Redis task.
    fn apply(self: &Arc<Self>, hub: &Arc<Hub>, op: Op<'_>) {
        match op {
            Op::Send { id, kind, payload } => {
                hub.send(&[Target::Socket(id)], kind, payload);
            }
            Op::Subscribe {
                delta,
                ids,
                channel,
            } => {
                let targets: Vec<Target> = ids.into_iter().map(Target::Socket).collect();
                hub.subscribe(&targets, &Bytes::copy_from_slice(channel), delta);
            }
            Op::SubscribeChannel {
                origin,
                delta,
                source,
                channel,
            } => {
                if origin != self.node {
                    let source = Target::Channel(Bytes::copy_from_slice(source));
                    hub.subscribe(&[source], &Bytes::copy_from_slice(channel), delta);
                }
            }
            Op::Close { id, code, reason } => {
                let reason = String::from_utf8_lossy(reason);
                hub.close(id, code, &reason);
            }
            Op::DeleteVirtual { id, expected } => {
                hub.delete_virtual_socket(id, expected);
            }
            Op::CreateVirtual {
                reply_to,
                request,
                target,
                prefix,
            } => {
                let id = hub.create_virtual_socket(target, Some(prefix)).ok();
                let answer = Op::Created { request, id };
                self.publish(hub, node_key(reply_to), answer.encode());
            }
            Op::Created { request, id } => self.answer(request, id),
            Op::Recover {
                epoch,
                offset,
                ids,
                channel,
            } => {
                let Some(policy) = hub.history_policy(channel) else {
                    return;
                };
                let channel = Bytes::copy_from_slice(channel);
                let epoch = epoch.to_vec();
                let (cluster, hub) = (self.clone(), hub.clone());
                // This runs on the listener, which the recover's Redis
                // calls must not hold up.
                tokio::spawn(async move {
                    let since = (&epoch[..], offset);
                    let _ = cluster
                        .recover_here(&hub, &ids, &channel, &policy, since)
                        .await;
                });
            }
        }
    }

    // -- docs/api.md#history: sequenced and kept by Redis -------------------

    /// `(epoch, last offset)` of a history channel; None when no policy
    /// covers it.
    pub(crate) fn position(
        &self,
        hub: &Hub,
        channel: &[u8],
    ) -> Result<Option<(Arc<str>, u64)>, Unreachable> {
        let Some(read) = self.read(hub, channel, 0, 0, None)? else {
            return Ok(None);
        };
        Ok(Some((epoch_str(&read.epoch), read.last)))
    }

    /// The kept messages after `since`, at most `limit`.
    pub(crate) fn history(
        &self,
        hub: &Hub,
        channel: &[u8],
        since: u64,
        limit: usize,
    ) -> Result<Option<Vec<Message>>, Unreachable> {
        Ok(self
            .read(hub, channel, since, limit, None)?
            .map(|read| read.kept))
    }

    fn read(
        &self,
        hub: &Hub,
        channel: &[u8],
        since: u64,
        limit: usize,
        epoch: Option<&[u8]>,
    ) -> Result<Option<Read>, Unreachable> {
        let Some(policy) = hub.history_policy(channel) else {
            return Ok(None);
        };
        self.conn
            .read(channel, policy, since, limit, epoch)
            .map(Some)
    }

    /// `recover` (docs/api.md#history): this node's targets are recovered
    /// here; another node's are sent to it, and the answer is then what
    /// this node reads from Redis.
    pub(crate) fn recover(
        &self,
        hub: &Hub,
        targets: &[u64],
        channel: &Bytes,
        since: (&str, u64),
    ) -> Result<Option<bool>, Unreachable> {
        let Some(policy) = hub.history_policy(channel) else {
            return Ok(None);
        };
        if !self.conn.is_up() {
            return Err(Unreachable("not connected".into()));
        }
        let (local, remote): (Vec<u64>, Vec<u64>) =
            targets.iter().partition(|&&id| !self.is_remote(id));
        let mut by_node: HashMap<u16, Vec<u64>> = HashMap::new();
        for id in remote {
            by_node.entry(owner(id)).or_default().push(id);
        }
        for ids in by_node.into_values() {
            let first = ids[0];
            let op = Op::Recover {
                epoch: since.0.as_bytes(),
                offset: since.1,
                ids,
                channel,
            };
            self.forward(hub, first, &op);
        }
        let since = (since.0.as_bytes(), since.1);
        if local.is_empty() {
            let read = self.read(hub, channel, since.1, 0, Some(since.0))?;
            return Ok(read.map(|read| read.recoverable(since.0, since.1)));
        }
        self.conn
            .wait(self.recover_here(hub, &local, channel, &policy, since))
            .map(Some)
    }

    /// Recovers this node's `ids`: holds their live messages from the
    /// subscription on, makes sure the node listens on the channel, reads
    /// it from Redis and hands over (see `relay`). On the Redis runtime.
    async fn recover_here(
        &self,
        hub: &Hub,
        ids: &[u64],
        channel: &Bytes,
        policy: &Policy,
        since: (&[u8], u64),
    ) -> redis::RedisResult<bool> {
        let mut hold = Holding {
            relays: &self.relays,
            hub,
            channel,
            policy,
            since,
            token: Some(self.relays.hold(hub, channel, ids)),
        };
        let listening = async {
            let (confirm, confirmed) = oneshot::channel();
            let _ = self
                .interest
                .send(Interest::Confirm(channel.clone(), confirm));
            confirmed.await.is_ok()
        };
        let read = async {
            if !listening.await {
                return Err(redis::RedisError::from(io::Error::other(
                    "the node lost its Redis connection",
                )));
            }
            let mut commands = self.conn.commands.clone();
            kept::read(
                &mut commands,
                channel,
                policy,
                since.1,
                usize::MAX,
                Some(since.0),
            )
            .await
        };
        // Within the caller's timeout, so that the hold ends here.
        let read =
            match tokio::time::timeout(REDIS_TIMEOUT - Duration::from_millis(100), read).await {
                Ok(read) => read,
                Err(_) => Err(redis::RedisError::from(io::Error::other(
                    "no answer in time",
                ))),
            }?;
        Ok(hold.release(Some(&read)))
    }

    // -- the key/value store: Redis's, as a client sees it -------------------

    pub(crate) fn get_key(&self, key: &[u8]) -> Result<Option<Bytes>, Unreachable> {
        self.conn.get_key(key)
    }

    pub(crate) fn set_key(
        &self,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<Option<Bytes>, Unreachable> {
        self.conn.set_key(key, value)
    }

    pub(crate) fn set_key_if(
        &self,
        key: &[u8],
        new: Option<&[u8]>,
        check: Option<&[u8]>,
    ) -> Result<bool, Unreachable> {
        self.conn.set_key_if(key, new, check)
    }

    pub(crate) fn key_count(&self) -> Result<usize, Unreachable> {
        self.conn.key_count()
    }

    // -- docs/api.md#presence -------------------------------------------------
    //
    // Tracks and untracks go through the hub, whose presence sink (see
    // `presence.rs`) has Redis decide them.

    pub(crate) fn presence(&self, channel: &[u8]) -> Result<Members, Unreachable> {
        presence::members(&self.conn, channel)
    }

    pub(crate) fn presence_count(&self, channel: &[u8]) -> Result<usize, Unreachable> {
        presence::count(&self.conn, channel)
    }
}

/// Counts a message handed to the publisher (`handed`), or not, in the
/// node's stats; 1 or 0.
fn count(hub: &Hub, handed: bool) -> usize {
    if handed {
        Counters::add(&hub.stats.cluster_messages_out, 1);
        1
    } else {
        Counters::add(&hub.stats.cluster_send_failures, 1);
        0
    }
}

/// A recover's hold on its targets; ended by `release`, or on drop (the
/// recover failed) with the subscription undone.
struct Holding<'a> {
    relays: &'a Relays,
    hub: &'a Hub,
    channel: &'a Bytes,
    policy: &'a Policy,
    since: (&'a [u8], u64),
    token: Option<relay::HoldToken>,
}

impl Holding<'_> {
    fn release(&mut self, read: Option<&Read>) -> bool {
        let Some(token) = self.token.take() else {
            return false;
        };
        self.relays
            .release(self.hub, self.channel, self.policy, token, read, self.since)
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.release(None);
    }
}

/// Epochs are made by the scripts from digits and dots.
fn epoch_str(epoch: &[u8]) -> Arc<str> {
    String::from_utf8_lossy(epoch).into()
}
