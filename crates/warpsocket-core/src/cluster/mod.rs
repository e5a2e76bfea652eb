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
//! (`link.rs`); the calls here never wait for Redis except where the API
//! returns what only Redis knows (kv, `has_subscriptions`, a virtual socket
//! created for another node's socket).
//!
//! Uses the hub (for the local part of every call, and to learn which
//! channels appear or vanish here) and the leaves; never the engine, which
//! sits above it and decides when a call goes through here.

mod kept;
mod link;
mod relay;
mod wire;

#[doc(hidden)]
pub use wire::reencode_message;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use redis::aio::ConnectionManager;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot, watch};

use crate::errors::{JoinError, Unreachable, VirtualError};
use crate::frame::Kind;
use crate::history::{Message, Policy};
use crate::hub::{ChannelWatcher, Hub, Target};
use crate::ids::owner;
use crate::stats::Counters;
use kept::Read;
use link::{Interest, Outgoing, REDIS_TIMEOUT};
use relay::Relays;
use wire::{node_key, pubsub_key, Broadcast, Op, Sequenced, ALL_NODES, KV_HASH};

/// Publishes waiting for the Redis connection; more count as failed sends.
const OUTGOING_CAPACITY: usize = 65_536;

pub struct Cluster {
    node: u16,
    /// Commands (kv, PUBLISH, PUBSUB NUMSUB); reconnects by itself.
    commands: ConnectionManager,
    outgoing: mpsc::Sender<Outgoing>,
    /// To the listener, for a recover that must know the node listens.
    interest: mpsc::UnboundedSender<Interest>,
    /// History channels' in-order delivery here, shared with the listener.
    relays: Arc<Relays>,
    /// True while the pub/sub connection is up; sends made while it is down
    /// fail at once instead of queueing.
    up: Arc<AtomicBool>,
    requests: Mutex<HashMap<u64, oneshot::Sender<Option<u64>>>>,
    next_request: AtomicU64,
    stop: watch::Sender<bool>,
    /// Calls blocked on the runtime; [`leave`](Self::leave) shuts it down
    /// only once there are none, since tokio panics when a runtime goes away
    /// under a `block_on`.
    calls: Mutex<Calls>,
    calls_done: Condvar,
    runtime: Mutex<Option<Runtime>>,
    handle: tokio::runtime::Handle,
}

#[derive(Default)]
struct Calls {
    /// Set by `leave`: no call starts after it.
    left: bool,
    waiting: usize,
}

/// Counts a call in [`Cluster::calls`] until it is back.
struct CallGuard<'a>(&'a Cluster);

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        let mut calls = self.0.calls.lock();
        calls.waiting -= 1;
        if calls.waiting == 0 {
            self.0.calls_done.notify_all();
        }
    }
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
        let client = redis::Client::open(url).map_err(|e| JoinError::BadUrl {
            url: url.to_owned(),
            why: e.to_string(),
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("warpsocket-redis")
            .enable_all()
            .build()
            .map_err(JoinError::Runtime)?;
        let handle = runtime.handle().clone();
        let unreachable = |why: String| JoinError::Unreachable {
            url: url.to_owned(),
            why,
        };
        let (commands, node) = handle
            .block_on(async { tokio::time::timeout(REDIS_TIMEOUT, link::connect(&client)).await })
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let (outgoing, outgoing_rx) = mpsc::channel(OUTGOING_CAPACITY);
        let (interest, interest_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let relays = Arc::new(Relays::default());
        let cluster = Arc::new(Cluster {
            node,
            commands: commands.clone(),
            outgoing,
            interest: interest.clone(),
            relays: relays.clone(),
            up: Arc::new(AtomicBool::new(false)),
            requests: Mutex::default(),
            next_request: AtomicU64::new(1),
            stop,
            calls: Mutex::default(),
            calls_done: Condvar::new(),
            runtime: Mutex::new(None),
            handle: handle.clone(),
        });
        // Watched before the listener takes its first snapshot of the
        // channels, so that no change falls between the two.
        hub.set_watcher(Some(Box::new(Watcher(interest))));
        hub.set_node(node);
        handle.spawn(link::publish(
            hub.clone(),
            commands,
            outgoing_rx,
            stop_rx.clone(),
        ));
        let (ready, subscribed) = oneshot::channel();
        let listener = link::Listener {
            node,
            commands: cluster.commands.clone(),
            up: cluster.up.clone(),
            relays,
        };
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
        *cluster.runtime.lock() = Some(runtime);
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
        self.calls.lock().left = true;
        self.stop.send_replace(true);
        {
            // Not long: every call returns as soon as it sees the stop signal.
            let mut calls = self.calls.lock();
            while calls.waiting > 0 {
                self.calls_done.wait(&mut calls);
            }
        }
        if let Some(runtime) = self.runtime.lock().take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
        hub.set_watcher(None);
        hub.set_node(0);
    }

    pub fn node(&self) -> u16 {
        self.node
    }

    /// True while the pub/sub connection to Redis is up.
    pub fn redis_connected(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn is_remote(&self, id: u64) -> bool {
        let owner = owner(id);
        owner != 0 && owner != self.node
    }

    /// Hands one message to the publisher; 1 when it was, 0 (and a failure
    /// counted) when Redis is down or the queue is full.
    fn publish(&self, hub: &Hub, channel: Bytes, message: Bytes) -> usize {
        self.queue(hub, Outgoing::Publish { channel, message })
    }

    fn queue(&self, hub: &Hub, outgoing: Outgoing) -> usize {
        if self.up.load(Ordering::Acquire) && self.outgoing.try_send(outgoing).is_ok() {
            Counters::add(&hub.stats.cluster_messages_out, 1);
            1
        } else {
            Counters::add(&hub.stats.cluster_send_failures, 1);
            0
        }
    }

    fn forward(&self, hub: &Hub, id: u64, op: &Op<'_>) -> bool {
        self.publish(hub, node_key(owner(id)), op.encode()) == 1
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
                        let body = Sequenced::body(kind, payload);
                        let kept = Outgoing::Kept {
                            name: name.clone(),
                            policy,
                            body,
                        };
                        if self.queue(hub, kept) == 1 {
                            sent += 1 + hub.subscriber_count(name);
                        }
                        continue;
                    }
                    let message = Broadcast::encode(self.node, kind, payload);
                    sent += self.publish(hub, pubsub_key(name, false), message);
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
        let mut remote: HashMap<u16, Vec<u64>> = HashMap::new();
        for target in targets {
            match target {
                Target::Socket(id) if self.is_remote(*id) => {
                    remote.entry(owner(*id)).or_default().push(*id)
                }
                Target::Channel(source) => {
                    let op = Op::SubscribeChannel {
                        origin: self.node,
                        delta,
                        source,
                        channel,
                    };
                    self.publish(hub, Bytes::from_static(ALL_NODES), op.encode());
                    local.push(target.clone());
                }
                Target::Socket(_) => local.push(target.clone()),
            }
        }
        for ids in remote.into_values() {
            let first = ids[0];
            let op = Op::Subscribe {
                delta,
                ids,
                channel,
            };
            self.forward(hub, first, &op);
        }
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
        // Without the pub/sub connection the answer could only come after a
        // timeout, and it would be stale by the time the node listens again.
        if !self.up.load(Ordering::Acquire) {
            return Err(Unreachable("not connected".into()));
        }
        let mut commands = self.commands.clone();
        let key = pubsub_key(channel, hub.history_policy(channel).is_some());
        let listening: Vec<(Vec<u8>, u64)> = self.wait(async move {
            redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&key[..])
                .query_async(&mut commands)
                .await
        })?;
        let nodes = listening.first().map_or(0, |(_, n)| *n);
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
            self.wait(async move {
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
        let mut commands = self.commands.clone();
        let (channel, epoch) = (channel.to_vec(), epoch.map(<[u8]>::to_vec));
        self.wait(async move {
            kept::read(
                &mut commands,
                &channel,
                &policy,
                since,
                limit,
                epoch.as_deref(),
            )
            .await
        })
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
        if !self.up.load(Ordering::Acquire) {
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
        self.wait(self.recover_here(hub, &local, channel, &policy, since))
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
            let mut commands = self.commands.clone();
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

    // -- the key/value store -------------------------------------------------

    pub(crate) fn get_key(&self, key: &[u8]) -> Result<Option<Bytes>, Unreachable> {
        let mut commands = self.commands.clone();
        let key = key.to_vec();
        let value: Option<Vec<u8>> = self.wait(async move {
            redis::cmd("HGET")
                .arg(KV_HASH)
                .arg(key)
                .query_async(&mut commands)
                .await
        })?;
        Ok(value.map(Bytes::from))
    }

    pub(crate) fn set_key(
        &self,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<Option<Bytes>, Unreachable> {
        let mut commands = self.commands.clone();
        let mut invocation = link::SET_KEY.prepare_invoke();
        invocation.key(KV_HASH).arg(key);
        match value {
            Some(v) => invocation.arg(1).arg(v),
            None => invocation.arg(0).arg(""),
        };
        let previous: Option<Vec<u8>> =
            self.wait(async move { invocation.invoke_async(&mut commands).await })?;
        Ok(previous.map(Bytes::from))
    }

    pub(crate) fn set_key_if(
        &self,
        key: &[u8],
        new: Option<&[u8]>,
        check: Option<&[u8]>,
    ) -> Result<bool, Unreachable> {
        let mut commands = self.commands.clone();
        let mut invocation = link::SET_KEY_IF.prepare_invoke();
        invocation.key(KV_HASH).arg(key);
        for part in [check, new] {
            match part {
                Some(v) => invocation.arg(1).arg(v),
                None => invocation.arg(0).arg(""),
            };
        }
        let done: i64 = self.wait(async move { invocation.invoke_async(&mut commands).await })?;
        Ok(done == 1)
    }

    pub(crate) fn key_count(&self) -> Result<usize, Unreachable> {
        let mut commands = self.commands.clone();
        self.wait(async move {
            redis::cmd("HLEN")
                .arg(KV_HASH)
                .query_async(&mut commands)
                .await
        })
    }

    /// Runs a Redis call from a thread outside the runtime, bounded in time
    /// and cut short when the node leaves.
    fn wait<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, Unreachable> {
        let left = || Unreachable("the node has left the cluster".into());
        {
            let mut calls = self.calls.lock();
            if calls.left {
                return Err(left());
            }
            calls.waiting += 1;
        }
        let _counted = CallGuard(self);
        let mut stop = self.stop.subscribe();
        let answer = self.handle.block_on(async {
            tokio::select! {
                answer = tokio::time::timeout(REDIS_TIMEOUT, call) => Some(answer),
                _ = stop.wait_for(|stop| *stop) => None,
            }
        });
        match answer {
            None => Err(left()),
            Some(Ok(Ok(value))) => Ok(value),
            Some(Ok(Err(e))) => Err(Unreachable(e.to_string())),
            Some(Err(_)) => Err(Unreachable(format!(
                "no answer within {} s",
                REDIS_TIMEOUT.as_secs()
            ))),
        }
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
