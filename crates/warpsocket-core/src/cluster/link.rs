//! The node's Redis I/O: joining, the publisher task, and the listener task
//! that keeps the pub/sub connection (reconnecting and re-subscribing with
//! backoff) and hands on what other nodes send.
//!
//! It knows its node only through [`Listener`] and the `apply` callback, so
//! that it sits below `cluster/mod.rs`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use redis::{Msg, RedisResult, Script};
use tokio::sync::{mpsc, oneshot, watch};

use super::kept;
use super::relay::{Arrival, Relays};
use super::wire::{
    node_key, pubsub_key, Broadcast, Op, Sequenced, ALL_NODES, CHANNEL_PREFIX, HISTORY_PREFIX,
    NODE_COUNTER,
};
use crate::history::Policy;
use crate::hub::{Hub, Target};
use crate::ids::node_number;
use crate::stats::Counters;

/// `set_key`: returns the previous value, stores ARGV[3] when ARGV[2] is 1,
/// deletes otherwise; one script so the two steps are atomic.
pub(super) static SET_KEY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local old = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
else redis.call('HDEL', KEYS[1], ARGV[1]) end
return old",
    )
});

/// `set_key_if`: ARGV[2..3] is the check (flag, value: flag 0 means "absent"),
/// ARGV[4..5] the new value (flag 0 means "delete"). Returns 1 when it happened.
pub(super) static SET_KEY_IF: LazyLock<Script> = LazyLock::new(|| {
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

/// After a Redis restart the node counter is gone: raise it past this
/// node's number again so a node joining later does not take it.
static KEEP_COUNTER_PAST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if (tonumber(redis.call('GET', KEYS[1])) or 0) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1]) end
return 1",
    )
});

/// How long a call that waits for Redis waits before it gives up.
pub(super) const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// PUBLISH commands sent to Redis in one pipeline.
const BATCH: usize = 256;

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
}

/// What the listener is told about the channels it should listen on.
pub(super) enum Interest {
    /// The channel appeared or vanished locally.
    Changed(Bytes),
    /// As `Changed`, and answered once the node listens on the channel (a
    /// recover waits for it: what Redis publishes from then on reaches it).
    Confirm(Bytes, oneshot::Sender<()>),
}

/// The command connection and this node's number.
pub(super) async fn connect(client: &redis::Client) -> RedisResult<(ConnectionManager, u16)> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(1))
        .set_response_timeout(REDIS_TIMEOUT)
        .set_number_of_retries(2)
        .set_max_delay(500);
    let mut commands = client.get_connection_manager_with_config(config).await?;
    kept::load(&mut commands).await?;
    let n: u64 = redis::cmd("INCR")
        .arg(NODE_COUNTER)
        .query_async(&mut commands)
        .await?;
    Ok((commands, node_number(n)))
}

/// Sends queued messages to Redis, many per round trip, in queue order (so
/// one thread's messages to one socket stay in order across nodes).
pub(super) async fn publish(
    hub: Arc<Hub>,
    mut commands: ConnectionManager,
    mut queue: mpsc::Receiver<Outgoing>,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            n = queue.recv_many(&mut batch, BATCH) => if n == 0 { return },
            _ = stopped(&mut stop) => return,
        }
        let mut sent = send_batch(&mut commands, &batch, true).await;
        if matches!(&sent, Err(e) if e.kind() == redis::ErrorKind::NoScriptError) {
            // Redis restarted and forgot the scripts: nothing of the batch
            // that runs one ran, so those go again.
            sent = match kept::load(&mut commands).await {
                Ok(()) => send_batch(&mut commands, &batch, false).await,
                Err(e) => Err(e),
            };
        }
        if let Err(e) = sent {
            Counters::add(&hub.stats.cluster_send_failures, batch.len() as u64);
            log::debug!(target: "warpsocket", "cluster: {} messages not published: {e}", batch.len());
        }
        batch.clear();
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

/// What the listener needs of its node.
pub(super) struct Listener {
    pub(super) node: u16,
    pub(super) commands: ConnectionManager,
    /// Set while the pub/sub connection is up.
    pub(super) up: Arc<AtomicBool>,
    pub(super) relays: Arc<Relays>,
}

/// Keeps this node listening on Redis: its own channel, the all-nodes
/// channel and every channel it has local subscribers for. Reconnects with
/// backoff and re-subscribes everything after a loss. Broadcasts from other
/// nodes go to the hub; requests go to `apply`.
pub(super) async fn listen(
    hub: Arc<Hub>,
    node: Listener,
    apply: impl Fn(&Arc<Hub>, Op<'_>) + Send + 'static,
    client: redis::Client,
    mut interest: mpsc::UnboundedReceiver<Interest>,
    mut stop: watch::Receiver<bool>,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = MIN_BACKOFF;
    let mut was_up = false;
    loop {
        let connected = tokio::select! {
            c = tokio::time::timeout(REDIS_TIMEOUT, listen_once(&hub, &node, &client)) => c,
            _ = stopped(&mut stop) => return,
        };
        if let Ok(Ok((mut sink, mut stream, mut listening))) = connected {
            node.up.store(true, Ordering::Release);
            if was_up {
                log::warn!(target: "warpsocket", "cluster: reconnected to Redis, listening on {} channels again", listening.len());
            }
            was_up = true;
            backoff = MIN_BACKOFF;
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
            loop {
                tokio::select! {
                    msg = stream.next() => match msg {
                        Some(msg) => receive(&hub, &node, &apply, &msg).await,
                        None => break,
                    },
                    Some(change) = interest.recv() => {
                        let (channel, confirm) = match change {
                            Interest::Changed(channel) => (channel, None),
                            Interest::Confirm(channel, confirm) => (channel, Some(confirm)),
                        };
                        if update_interest(&hub, &node.relays, &mut sink, &mut listening, channel).await.is_err() {
                            break;
                        }
                        if let Some(confirm) = confirm {
                            let _ = confirm.send(());
                        }
                    }
                    _ = stopped(&mut stop) => return,
                }
            }
            node.up.store(false, Ordering::Release);
            log::warn!(target: "warpsocket", "cluster: lost the connection to Redis; cross-node messages fail until it is back");
        }
        // While away, changes of interest need no action: the next
        // connection subscribes to the hub's current channels.
        let pause = tokio::time::sleep(backoff);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                _ = &mut pause => break,
                Some(_) = interest.recv() => {}
                _ = stopped(&mut stop) => return,
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

type Listening = (PubSubSink, redis::aio::PubSubStream, HashSet<Bytes>);

async fn listen_once(hub: &Hub, node: &Listener, client: &redis::Client) -> RedisResult<Listening> {
    let (mut sink, stream) = client.get_async_pubsub().await?.split();
    sink.subscribe(&node_key(node.node)[..]).await?;
    sink.subscribe(ALL_NODES).await?;
    let mut listening = HashSet::new();
    for name in hub.channel_names() {
        let history = hub.history_policy(&name).is_some();
        sink.subscribe(&pubsub_key(&name, history)[..]).await?;
        listening.insert(name);
    }
    let mut commands = node.commands.clone();
    kept::load(&mut commands).await?;
    KEEP_COUNTER_PAST
        .key(NODE_COUNTER)
        .arg(node.node)
        .invoke_async::<()>(&mut commands)
        .await?;
    Ok((sink, stream, listening))
}

/// Subscribes to or unsubscribes from `channel` on Redis to match whether it
/// has local subscribers now (first in, last out).
async fn update_interest(
    hub: &Hub,
    relays: &Relays,
    sink: &mut PubSubSink,
    listening: &mut HashSet<Bytes>,
    channel: Bytes,
) -> RedisResult<()> {
    let wanted = hub.has_channel(&channel);
    let key = pubsub_key(&channel, hub.history_policy(&channel).is_some());
    if wanted && !listening.contains(&channel) {
        sink.subscribe(&key[..]).await?;
        listening.insert(channel);
    } else if !wanted && listening.remove(&channel) {
        relays.forget(&channel);
        sink.unsubscribe(&key[..]).await?;
    }
    Ok(())
}

async fn receive(hub: &Arc<Hub>, node: &Listener, apply: &impl Fn(&Arc<Hub>, Op<'_>), msg: &Msg) {
    let Ok(channel) = msg.get_channel::<Vec<u8>>() else {
        return;
    };
    let payload = msg.get_payload_bytes();
    if let Some(name) = channel.strip_prefix(HISTORY_PREFIX) {
        match (Sequenced::decode(payload), hub.history_policy(name)) {
            (Some(message), Some(policy)) => {
                Counters::add(&hub.stats.cluster_messages_in, 1);
                relay(hub, node, name, &policy, &message).await;
            }
            (None, _) => {
                log::warn!(target: "warpsocket", "cluster: undecodable history message dropped")
            }
            // The policies changed since the node listened on it.
            (_, None) => {}
        }
        return;
    }
    if let Some(name) = channel.strip_prefix(CHANNEL_PREFIX) {
        match Broadcast::decode(payload) {
            // Its own broadcasts were delivered locally already.
            Some(b) if b.origin == node.node => {}
            Some(b) => {
                Counters::add(&hub.stats.cluster_messages_in, 1);
                let target = [Target::Channel(Bytes::copy_from_slice(name))];
                hub.send(&target, b.kind, b.payload);
            }
            None => log::warn!(target: "warpsocket", "cluster: undecodable broadcast dropped"),
        }
        return;
    }
    match Op::decode(payload) {
        Some(op) => {
            Counters::add(&hub.stats.cluster_messages_in, 1);
            apply(hub, op);
        }
        None => log::warn!(target: "warpsocket", "cluster: undecodable request dropped"),
    }
}

/// Delivers a history channel's message in offset order: when messages are
/// missing before it (published while this node's pub/sub connection was
/// down), those still kept in Redis go first.
async fn relay(hub: &Hub, node: &Listener, name: &[u8], policy: &Policy, message: &Sequenced<'_>) {
    let Arrival::Gap { after } = node.relays.arrive(hub, name, policy, message, true) else {
        return;
    };
    let missing = usize::try_from(message.offset - after - 1).unwrap_or(usize::MAX);
    let mut commands = node.commands.clone();
    let read = tokio::time::timeout(
        REDIS_TIMEOUT,
        kept::read(
            &mut commands,
            name,
            policy,
            after,
            missing,
            Some(message.epoch),
        ),
    )
    .await;
    match read {
        Ok(Ok(read)) => {
            for (offset, kind, data) in &read.kept {
                let filled = Sequenced {
                    epoch: message.epoch,
                    offset: *offset,
                    kind: *kind,
                    payload: data,
                };
                if *offset < message.offset {
                    node.relays.arrive(hub, name, policy, &filled, false);
                }
            }
            log::warn!(target: "warpsocket", "cluster: filled a gap of {missing} messages in a history channel from Redis ({} still kept)", read.kept.len());
        }
        _ => {
            log::warn!(target: "warpsocket", "cluster: {missing} messages of a history channel missed and not read back from Redis")
        }
    }
    node.relays.arrive(hub, name, policy, message, false);
}

/// Completes once the node leaves (the watch guard must not live across an
/// await: it is not `Send`).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
