//! Cluster mode (API.md §7): this process is one node of many that share a
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

mod link;
mod wire;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot, watch};

use crate::engine::{Engine, Target, VirtualError};
use crate::frame::Kind;
use crate::stats::Counters;
use wire::{Broadcast, Op};

/// Node numbers live above this bit of a socket id; below it, the node's own
/// sequence. 13 bits of node keep every id below 2^53, exact in JSON numbers.
pub const NODE_SHIFT: u32 = 40;
const MAX_NODE: u64 = (1 << 13) - 1;

/// How long a call that waits for Redis waits before it gives up.
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// Publishes waiting for the Redis connection; more count as failed sends.
const OUTGOING_CAPACITY: usize = 65_536;

const NODE_COUNTER: &str = "warpsocket:nodes";
const KV_HASH: &str = "warpsocket:kv";
const ALL_NODES: &[u8] = b"warpsocket:all";
const CHANNEL_PREFIX: &[u8] = b"warpsocket:c:";

/// Why a call that needed Redis could not be answered.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redis is unreachable: {}", self.0)
    }
}

/// The node that handed out `id` (0: a process not in a cluster).
pub fn owner(id: u64) -> u16 {
    (id >> NODE_SHIFT) as u16
}

pub(crate) fn channel_key(name: &[u8]) -> Bytes {
    [CHANNEL_PREFIX, name].concat().into()
}

fn node_key(node: u16) -> Bytes {
    format!("warpsocket:n:{node}").into_bytes().into()
}

pub struct Cluster {
    node: u16,
    /// Commands (kv, PUBLISH, PUBSUB NUMSUB); reconnects by itself.
    commands: ConnectionManager,
    outgoing: mpsc::Sender<(Bytes, Bytes)>,
    /// Channels whose local subscriptions changed: the subscriber task
    /// checks whether this node should (still) listen to them on Redis.
    interest: mpsc::UnboundedSender<Bytes>,
    /// True while the pub/sub connection is up; sends made while it is down
    /// fail at once instead of queueing.
    up: Arc<AtomicBool>,
    requests: Mutex<HashMap<u64, oneshot::Sender<Option<u64>>>>,
    next_request: AtomicU64,
    stop: watch::Sender<bool>,
    runtime: Mutex<Option<Runtime>>,
    handle: tokio::runtime::Handle,
}

impl Cluster {
    /// Connects to Redis at `url`, takes a node number and starts listening.
    /// Fails when Redis cannot be reached now.
    pub(crate) fn join(engine: &Arc<Engine>, url: &str) -> io::Result<Arc<Cluster>> {
        let client = redis::Client::open(url).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad Redis URL {url:?}: {e}"),
            )
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("warpsocket-redis")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let unreachable = |e: String| {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("cannot reach Redis at {url}: {e}"),
            )
        };
        let (commands, node) = handle
            .block_on(async { tokio::time::timeout(REDIS_TIMEOUT, link::connect(&client)).await })
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let (outgoing, outgoing_rx) = mpsc::channel(OUTGOING_CAPACITY);
        let (interest, interest_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let cluster = Arc::new(Cluster {
            node,
            commands: commands.clone(),
            outgoing,
            interest,
            up: Arc::new(AtomicBool::new(false)),
            requests: Mutex::default(),
            next_request: AtomicU64::new(1),
            stop,
            runtime: Mutex::new(None),
            handle: handle.clone(),
        });
        handle.spawn(link::publish(
            engine.clone(),
            commands,
            outgoing_rx,
            stop_rx.clone(),
        ));
        let (ready, subscribed) = oneshot::channel();
        handle.spawn(link::listen(
            engine.clone(),
            cluster.clone(),
            client,
            interest_rx,
            stop_rx,
            ready,
        ));
        // Serving before the node listens would lose the first messages for it.
        let _ = handle.block_on(async { tokio::time::timeout(REDIS_TIMEOUT, subscribed).await });
        *cluster.runtime.lock() = Some(runtime);
        Ok(cluster)
    }

    /// Stops the Redis tasks and closes their connections.
    pub(crate) fn leave(&self) {
        self.stop.send_replace(true);
        if let Some(runtime) = self.runtime.lock().take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }

    pub fn node(&self) -> u16 {
        self.node
    }

    /// The first id this node hands out has these bits set.
    pub(crate) fn id_base(&self) -> u64 {
        u64::from(self.node) << NODE_SHIFT
    }

    fn is_remote(&self, id: u64) -> bool {
        let owner = owner(id);
        owner != 0 && owner != self.node
    }

    /// Hands one message to the publisher; 1 when it was, 0 (and a failure
    /// counted) when Redis is down or the queue is full.
    fn publish(&self, engine: &Engine, channel: Bytes, message: Bytes) -> usize {
        if self.up.load(Ordering::Acquire) && self.outgoing.try_send((channel, message)).is_ok() {
            Counters::add(&engine.stats.cluster_messages_out, 1);
            1
        } else {
            Counters::add(&engine.stats.cluster_send_failures, 1);
            0
        }
    }

    fn forward(&self, engine: &Engine, id: u64, op: &Op<'_>) -> bool {
        self.publish(engine, node_key(owner(id)), op.encode()) == 1
    }

    // -- the engine's calls, routed ----------------------------------------

    pub(crate) fn send(
        &self,
        engine: &Engine,
        targets: &[Target],
        kind: Kind,
        payload: &[u8],
    ) -> usize {
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
                    sent += usize::from(self.forward(engine, *id, &op));
                }
                Target::Channel(name) => {
                    let message = Broadcast::encode(self.node, kind, payload);
                    sent += self.publish(engine, channel_key(name), message);
                    local.push(target.clone());
                }
                Target::Socket(_) => local.push(target.clone()),
            }
        }
        sent + engine.send_local(&local, kind, payload)
    }

    pub(crate) fn subscribe(
        &self,
        engine: &Engine,
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
                    self.publish(engine, Bytes::from_static(ALL_NODES), op.encode());
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
            self.forward(engine, first, &op);
        }
        engine.subscribe_local(&local, channel, delta)
    }

    /// Called after a local subscription appeared or went away.
    pub(crate) fn subscriptions_changed(&self, channel: &Bytes) {
        let _ = self.interest.send(channel.clone());
    }

    /// Whether another node has subscribers for `channel`: the number of
    /// nodes listening on it, less this one.
    pub(crate) fn others_subscribed(
        &self,
        engine: &Engine,
        channel: &[u8],
    ) -> Result<bool, Unreachable> {
        // Without the pub/sub connection the answer could only come after a
        // timeout, and it would be stale by the time the node listens again.
        if !self.up.load(Ordering::Acquire) {
            return Err(Unreachable("not connected".into()));
        }
        let mut commands = self.commands.clone();
        let key = channel_key(channel);
        let listening: Vec<(Vec<u8>, u64)> = self.wait(async move {
            redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&key[..])
                .query_async(&mut commands)
                .await
        })?;
        let nodes = listening.first().map_or(0, |(_, n)| *n);
        let me = u64::from(engine.listens_to(channel));
        Ok(nodes > me)
    }

    pub(crate) fn close(&self, engine: &Engine, id: u64, code: u16, reason: &str) -> Option<bool> {
        self.is_remote(id).then(|| {
            let op = Op::Close {
                id,
                code,
                reason: reason.as_bytes(),
            };
            self.forward(engine, id, &op)
        })
    }

    pub(crate) fn delete_virtual_socket(
        &self,
        engine: &Engine,
        id: u64,
        expected: Option<u64>,
    ) -> Option<bool> {
        self.is_remote(id)
            .then(|| self.forward(engine, id, &Op::DeleteVirtual { id, expected }))
    }

    /// A virtual socket for another node's socket is made by that node (it
    /// lives where its connection does); this waits for its answer.
    pub(crate) fn create_virtual_socket(
        &self,
        engine: &Engine,
        target: u64,
        prefix: &[u8],
    ) -> Option<Result<u64, VirtualError>> {
        if !self.is_remote(target) {
            return None;
        }
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.requests.lock().insert(request, tx);
        let op = Op::CreateVirtual {
            reply_to: self.node,
            request,
            target,
            prefix,
        };
        let answer = if self.forward(engine, target, &op) {
            self.wait(async move {
                rx.await
                    .map_err(|_| redis::RedisError::from(io::Error::other("no answer")))
            })
        } else {
            Err(Unreachable("not connected".into()))
        };
        self.requests.lock().remove(&request);
        Some(match answer {
            Ok(Some(id)) => Ok(id),
            Ok(None) => Err(VirtualError::NoSuchSocket),
            Err(e) => Err(VirtualError::Unreachable(e.0)),
        })
    }

    fn answer(&self, request: u64, id: Option<u64>) {
        if let Some(waiting) = self.requests.lock().remove(&request) {
            let _ = waiting.send(id);
        }
    }

    /// Applies a request from another node. Runs on the Redis task.
    fn apply(&self, engine: &Engine, op: Op<'_>) {
        match op {
            Op::Send { id, kind, payload } => {
                engine.send_local(&[Target::Socket(id)], kind, payload);
            }
            Op::Subscribe {
                delta,
                ids,
                channel,
            } => {
                let targets: Vec<Target> = ids.into_iter().map(Target::Socket).collect();
                engine.subscribe_local(&targets, &Bytes::copy_from_slice(channel), delta);
            }
            Op::SubscribeChannel {
                origin,
                delta,
                source,
                channel,
            } => {
                if origin != self.node {
                    let source = Target::Channel(Bytes::copy_from_slice(source));
                    engine.subscribe_local(&[source], &Bytes::copy_from_slice(channel), delta);
                }
            }
            Op::Close { id, code, reason } => {
                let reason = String::from_utf8_lossy(reason);
                engine.close_local(id, code, &reason);
            }
            Op::DeleteVirtual { id, expected } => {
                engine.delete_virtual_socket_local(id, expected);
            }
            Op::CreateVirtual {
                reply_to,
                request,
                target,
                prefix,
            } => {
                let id = engine
                    .create_virtual_socket_local(target, Some(prefix))
                    .ok();
                let answer = Op::Created { request, id };
                self.publish(engine, node_key(reply_to), answer.encode());
            }
            Op::Created { request, id } => self.answer(request, id),
        }
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

    /// Runs a Redis call from a thread outside the runtime, bounded in time.
    fn wait<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, Unreachable> {
        if *self.stop.borrow() {
            return Err(Unreachable("the node has left the cluster".into()));
        }
        match self
            .handle
            .block_on(async { tokio::time::timeout(REDIS_TIMEOUT, call).await })
        {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Unreachable(e.to_string())),
            Err(_) => Err(Unreachable(format!(
                "no answer within {} s",
                REDIS_TIMEOUT.as_secs()
            ))),
        }
    }
}

/// The node number for the `n`th node to join: 1..=MAX_NODE, wrapping.
fn node_number(n: u64) -> u16 {
    ((n.saturating_sub(1) % MAX_NODE) + 1) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_numbers_stay_in_range_and_ids_stay_exact_in_json() {
        assert_eq!(node_number(1), 1);
        assert_eq!(node_number(MAX_NODE), MAX_NODE as u16);
        assert_eq!(node_number(MAX_NODE + 1), 1);
        let last = (MAX_NODE << NODE_SHIFT) | ((1 << NODE_SHIFT) - 1);
        assert!(last < 1 << 53);
        assert_eq!(owner(last), MAX_NODE as u16);
        assert_eq!(owner(12345), 0);
    }
}
