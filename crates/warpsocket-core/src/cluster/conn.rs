//! The Redis side that a node ([`super::Cluster`]) and a process that only
//! talks to a cluster ([`super::Client`]) share, so both speak the same wire
//! format to the same keys: the runtime its tasks run on, the command
//! connection, the batched publisher, the key/value scripts, and the
//! requests every process may make of the cluster (a request to a socket's
//! owner node, a channel broadcast, a history channel's message, a read of
//! a history channel, a pub/sub subscriber count).
//!
//! Knows no hub: what a node adds (its number, its listener, its local
//! sockets) stays in `link.rs` and `mod.rs`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::{Condvar, Mutex};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::{mpsc, oneshot, watch};

use super::kept::{self, Read};
use super::wire::{
    node_key, pubsub_key, Broadcast, Op, Sequenced, ALL_NODES, CLIENTS_KEY, KV_HASH,
};
use crate::errors::{JoinError, Unreachable};
use crate::frame::Kind;
use crate::history::Policy;
use crate::ids::owner;

/// `set_key`: returns the previous value, stores ARGV[3] when ARGV[2] is 1,
/// deletes otherwise; one script so the two steps are atomic.
static SET_KEY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local old = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
else redis.call('HDEL', KEYS[1], ARGV[1]) end
return old",
    )
});

/// `set_key_if`: ARGV[2..3] is the check (flag, value: flag 0 means "absent"),
/// ARGV[4..5] the new value (flag 0 means "delete"). Returns 1 when it happened.
static SET_KEY_IF: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local current = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  if current ~= ARGV[3] then return 0 end
elseif current then return 0 end
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
else redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1",
    )
});

/// How long a call that waits for Redis waits before it gives up.
pub(super) const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
pub(super) const MIN_BACKOFF: Duration = Duration::from_millis(50);
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// PUBLISH commands sent to Redis in one pipeline.
const BATCH: usize = 256;
/// Publishes waiting for the Redis connection; more count as failed sends.
const OUTGOING_CAPACITY: usize = 65_536;

/// What the publisher sends, in queue order.
pub(super) enum Outgoing {
    /// A PUBLISH of `message` on the pub/sub channel `channel`.
    Publish { channel: Bytes, message: Bytes },
    /// A message for the history channel `name`, which Redis sequences,
    /// keeps and publishes (`body`: the kind byte and the data).
    Kept {
        name: Bytes,
        policy: Policy,
        body: Bytes,
    },
    /// Answered once everything queued before it went to Redis (or failed):
    /// `close` waits for it so that a send counted before a disconnect is
    /// not lost with the runtime.
    Flush(oneshot::Sender<()>),
}

/// Called with the number of messages of a batch Redis did not take.
pub(super) type OnFailure = Box<dyn Fn(u64) + Send + Sync>;

/// A process's Redis connections and the tasks that use them.
pub(super) struct Conn {
    /// Commands (kv, PUBLISH, PUBSUB NUMSUB, scripts); reconnects by itself.
    pub(super) commands: ConnectionManager,
    outgoing: mpsc::Sender<Outgoing>,
    /// True while a pub/sub connection (the node's listener, or the
    /// client's watcher) is up: sends made while it is down fail at once
    /// instead of queueing.
    pub(super) up: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    /// Calls blocked on the runtime; [`close`](Self::close) shuts it down
    /// only once there are none, since tokio panics when a runtime goes away
    /// under a `block_on`.
    calls: Mutex<Calls>,
    calls_done: Condvar,
    runtime: Mutex<Option<Runtime>>,
    pub(super) handle: Handle,
    /// Why a call fails once closed.
    closed: &'static str,
}

#[derive(Default)]
struct Calls {
    /// Set by `close`: no call starts after it.
    closed: bool,
    waiting: usize,
}

/// Counts a call in [`Conn::calls`] until it is back.
struct CallGuard<'a>(&'a Conn);

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        let mut calls = self.0.calls.lock();
        calls.waiting -= 1;
        if calls.waiting == 0 {
            self.0.calls_done.notify_all();
        }
    }
}

impl Conn {
    /// Starts a runtime of one thread named `thread_name`, connects the
    /// command connection to Redis at `url`, loads the scripts and starts
    /// the publisher (whose failed batches go to `on_failure`). `up` stays
    /// false until the caller's pub/sub task sets it. Fails when the URL is
    /// bad or Redis does not answer within [`REDIS_TIMEOUT`].
    pub(super) fn open(
        url: &str,
        thread_name: &str,
        closed: &'static str,
        on_failure: OnFailure,
    ) -> Result<(Conn, redis::Client), JoinError> {
        let client = redis::Client::open(url).map_err(|e| JoinError::BadUrl {
            url: url.to_owned(),
            why: e.to_string(),
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(thread_name)
            .enable_all()
            .build()
            .map_err(JoinError::Runtime)?;
        let handle = runtime.handle().clone();
        let commands = handle
            .block_on(async { tokio::time::timeout(REDIS_TIMEOUT, connect(&client)).await })
            .map_err(|_| unreachable(url, "timed out".into()))?
            .map_err(|e| unreachable(url, e.to_string()))?;
        let (outgoing, outgoing_rx) = mpsc::channel(OUTGOING_CAPACITY);
        let (stop, stop_rx) = watch::channel(false);
        handle.spawn(publish(commands.clone(), outgoing_rx, stop_rx, on_failure));
        let conn = Conn {
            commands,
            outgoing,
            up: Arc::new(AtomicBool::new(false)),
            stop,
            calls: Mutex::default(),
            calls_done: Condvar::new(),
            runtime: Mutex::new(Some(runtime)),
            handle,
            closed,
        };
        Ok((conn, client))
    }

    /// Completes once [`close`](Self::close) is called: for the tasks.
    pub(super) fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Stops the tasks and closes the connections; calls made after it fail.
    /// From a thread outside the runtime.
    pub(super) fn close(&self) {
        self.calls.lock().closed = true;
        // Sends stop counting (they need `up`), then what they queued goes
        // out before the publisher stops.
        if self.up.swap(false, Ordering::AcqRel) {
            self.flush();
        }
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
    }

    /// Waits (at most [`REDIS_TIMEOUT`]) until the publisher has handed
    /// Redis everything queued so far.
    fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        let outgoing = self.outgoing.clone();
        self.handle.block_on(async move {
            // The timer needs the runtime: built inside block_on.
            let handed = async {
                if outgoing.send(Outgoing::Flush(done)).await.is_ok() {
                    let _ = flushed.await;
                }
            };
            let _ = tokio::time::timeout(REDIS_TIMEOUT, handed).await;
        });
    }

    pub(super) fn is_closed(&self) -> bool {
        self.calls.lock().closed
    }

    pub(super) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Hands one message to the publisher: false when Redis is down (or the
    /// connection closed) or the queue is full.
    pub(super) fn queue(&self, outgoing: Outgoing) -> bool {
        self.is_up() && self.outgoing.try_send(outgoing).is_ok()
    }

    pub(super) fn publish(&self, channel: Bytes, message: Bytes) -> bool {
        self.queue(Outgoing::Publish { channel, message })
    }

    /// Sends a request to the node that owns socket `id`.
    pub(super) fn forward(&self, id: u64, op: &Op<'_>) -> bool {
        self.publish(node_key(owner(id)), op.encode())
    }

    /// Asks the nodes that own `ids` to change their subscriptions to
    /// `channel` by `delta`, one request per node; `handed` hears whether
    /// each request reached the publisher.
    pub(super) fn forward_subscribe(
        &self,
        ids: Vec<u64>,
        channel: &[u8],
        delta: i64,
        mut handed: impl FnMut(bool),
    ) {
        let mut by_node: HashMap<u16, Vec<u64>> = HashMap::new();
        for id in ids {
            by_node.entry(owner(id)).or_default().push(id);
        }
        for ids in by_node.into_values() {
            let first = ids[0];
            handed(self.forward(
                first,
                &Op::Subscribe {
                    delta,
                    ids,
                    channel,
                },
            ));
        }
    }

    /// Asks every node to change the subscriptions of `source`'s
    /// subscribers to `channel` by `delta` (`origin`: the asking node, which
    /// applies it itself).
    pub(super) fn subscribe_channel(
        &self,
        origin: u16,
        source: &[u8],
        channel: &[u8],
        delta: i64,
    ) -> bool {
        let op = Op::SubscribeChannel {
            origin,
            delta,
            source,
            channel,
        };
        self.publish(Bytes::from_static(ALL_NODES), op.encode())
    }

    /// Publishes a message of channel `name` for every node but `origin`
    /// (which delivered it to its own subscribers already).
    pub(super) fn broadcast(&self, origin: u16, name: &[u8], kind: Kind, payload: &[u8]) -> bool {
        let message = Broadcast::encode(origin, kind, payload);
        self.publish(pubsub_key(name, false), message)
    }

    /// Hands a message of history channel `name` to Redis, which gives it
    /// its offset, keeps it and publishes it to every node.
    pub(super) fn send_kept(
        &self,
        name: Bytes,
        policy: Policy,
        kind: Kind,
        payload: &[u8],
    ) -> bool {
        let body = Sequenced::body(kind, payload);
        self.queue(Outgoing::Kept { name, policy, body })
    }

    /// How many connections (nodes, for a channel's key) listen on the
    /// pub/sub channel `key`.
    pub(super) fn listeners(&self, key: &Bytes) -> Result<u64, Unreachable> {
        // Without a pub/sub connection the answer could only come after a
        // timeout.
        if !self.is_up() {
            return Err(Unreachable("not connected".into()));
        }
        let mut commands = self.commands.clone();
        let key = key.clone();
        let listening: Vec<(Vec<u8>, u64)> = self.wait(async move {
            redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&key[..])
                .query_async(&mut commands)
                .await
        })?;
        Ok(listening.first().map_or(0, |(_, n)| *n))
    }

    /// Reads a history channel: its sequence, and its kept messages after
    /// `since` (at most `limit`; those of `epoch` only, when given).
    pub(super) fn read(
        &self,
        channel: &[u8],
        policy: Policy,
        since: u64,
        limit: usize,
        epoch: Option<&[u8]>,
    ) -> Result<Read, Unreachable> {
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
    }

    // -- the key/value store -------------------------------------------------

    pub(super) fn get_key(&self, key: &[u8]) -> Result<Option<Bytes>, Unreachable> {
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

    pub(super) fn set_key(
        &self,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<Option<Bytes>, Unreachable> {
        let mut commands = self.commands.clone();
        let mut invocation = SET_KEY.prepare_invoke();
        invocation.key(KV_HASH).arg(key);
        match value {
            Some(v) => invocation.arg(1).arg(v),
            None => invocation.arg(0).arg(""),
        };
        let previous: Option<Vec<u8>> =
            self.wait(async move { invocation.invoke_async(&mut commands).await })?;
        Ok(previous.map(Bytes::from))
    }

    pub(super) fn set_key_if(
        &self,
        key: &[u8],
        new: Option<&[u8]>,
        check: Option<&[u8]>,
    ) -> Result<bool, Unreachable> {
        let mut commands = self.commands.clone();
        let mut invocation = SET_KEY_IF.prepare_invoke();
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

    pub(super) fn key_count(&self) -> Result<usize, Unreachable> {
        let mut commands = self.commands.clone();
        self.wait(async move {
            redis::cmd("HLEN")
                .arg(KV_HASH)
                .query_async(&mut commands)
                .await
        })
    }

    /// Runs a Redis call from a thread outside the runtime, bounded in time
    /// and cut short when the connection is closed.
    pub(super) fn wait<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unreachable> {
        let closed = || Unreachable(self.closed.into());
        {
            let mut calls = self.calls.lock();
            if calls.closed {
                return Err(closed());
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
            None => Err(closed()),
            Some(Ok(Ok(value))) => Ok(value),
            Some(Ok(Err(e))) => Err(Unreachable(e.to_string())),
            Some(Err(_)) => Err(Unreachable(format!(
                "no answer within {} s",
                REDIS_TIMEOUT.as_secs()
            ))),
        }
    }
}

fn unreachable(url: &str, why: String) -> JoinError {
    JoinError::Unreachable {
        url: url.to_owned(),
        why,
    }
}

/// The command connection, with the scripts loaded.
async fn connect(client: &redis::Client) -> RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(1))
        .set_response_timeout(REDIS_TIMEOUT)
        .set_number_of_retries(2)
        .set_max_delay(500);
    let mut commands = client.get_connection_manager_with_config(config).await?;
    kept::load(&mut commands).await?;
    Ok(commands)
}

/// Sends queued messages to Redis, many per round trip, in queue order (so
/// one thread's messages to one socket stay in order across nodes).
async fn publish(
    mut commands: ConnectionManager,
    mut queue: mpsc::Receiver<Outgoing>,
    mut stop: watch::Receiver<bool>,
    on_failure: OnFailure,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            n = queue.recv_many(&mut batch, BATCH) => if n == 0 { return },
            _ = stopped(&mut stop) => return,
        }
        let flushes = batch
            .iter()
            .filter(|o| matches!(o, Outgoing::Flush(_)))
            .count();
        let mut sent = if flushes == batch.len() {
            Ok(())
        } else {
            send_batch(&mut commands, &batch, true).await
        };
        if matches!(&sent, Err(e) if e.kind() == redis::ErrorKind::NoScriptError) {
            // Redis restarted and forgot the scripts: nothing of the batch
            // that runs one ran, so those go again.
            sent = match kept::load(&mut commands).await {
                Ok(()) => send_batch(&mut commands, &batch, false).await,
                Err(e) => Err(e),
            };
        }
        if let Err(e) = sent {
            let lost = (batch.len() - flushes) as u64;
            on_failure(lost);
            log::debug!(target: "warpsocket", "cluster: {lost} messages not published: {e}");
        }
        for outgoing in batch.drain(..) {
            if let Outgoing::Flush(done) = outgoing {
                let _ = done.send(());
            }
        }
    }
}

/// One pipeline of `batch` (without its plain publishes unless `publishes`).
async fn send_batch(
    commands: &mut ConnectionManager,
    batch: &[Outgoing],
    publishes: bool,
) -> RedisResult<()> {
    let mut pipe = redis::pipe();
    let mut kept = kept::Batch::default();
    for outgoing in batch {
        match outgoing {
            Outgoing::Publish { channel, message } => {
                if publishes {
                    pipe.cmd("PUBLISH")
                        .arg(&channel[..])
                        .arg(&message[..])
                        .ignore();
                }
            }
            Outgoing::Kept { name, policy, body } => kept.add(name, policy, body),
            Outgoing::Flush(_) => {}
        }
    }
    if !kept.is_empty() {
        kept.add_to(&mut pipe);
    }
    match tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async::<()>(commands)).await {
        Ok(sent) => sent,
        Err(_) => Err(redis::RedisError::from((
            redis::ErrorKind::IoError,
            "no answer in time",
        ))),
    }
}

/// For a process that is no node: keeps a pub/sub connection (listening on
/// a channel nobody publishes to) only to know whether Redis is up, as a
/// node knows it from its listener. Reconnects with backoff; `ready` is
/// answered on the first connection.
pub(super) async fn watch_up(
    client: redis::Client,
    up: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = MIN_BACKOFF;
    loop {
        let connected = tokio::select! {
            c = tokio::time::timeout(REDIS_TIMEOUT, async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(CLIENTS_KEY).await?;
                RedisResult::Ok(pubsub)
            }) => c,
            _ = stopped(&mut stop) => return,
        };
        if let Ok(Ok(pubsub)) = connected {
            up.store(true, Ordering::Release);
            backoff = MIN_BACKOFF;
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
            let mut stream = pubsub.into_on_message();
            loop {
                tokio::select! {
                    msg = stream.next() => if msg.is_none() { break },
                    _ = stopped(&mut stop) => return,
                }
            }
            up.store(false, Ordering::Release);
            log::warn!(target: "warpsocket", "cluster client: lost the connection to Redis; sends fail until it is back");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut stop) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Completes once the connection is closed (the watch guard must not live
/// across an await: it is not `Send`).
pub(super) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
