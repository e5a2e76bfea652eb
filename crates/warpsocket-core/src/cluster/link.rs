//! The node's own Redis I/O (the publisher and the command connection are
//! `conn.rs`'s): its number, and the listener task that keeps the pub/sub
//! connection (reconnecting and re-subscribing with backoff) and hands on
//! what other nodes and clients send.
//!
//! It knows its node only through [`Listener`] and the `apply` callback, so
//! that it sits below `cluster/mod.rs`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, PubSubSink};
use redis::{Msg, RedisResult, Script};
use tokio::sync::{mpsc, oneshot, watch};

use super::conn::{stopped, MAX_BACKOFF, MIN_BACKOFF, REDIS_TIMEOUT};
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

/// After a Redis restart the node counter is gone: raise it past this
/// node's number again so a node joining later does not take it.
static KEEP_COUNTER_PAST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if (tonumber(redis.call('GET', KEYS[1])) or 0) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1]) end
return 1",
    )
});

/// What the listener is told about the channels it should listen on.
pub(super) enum Interest {
    /// The channel appeared or vanished locally.
    Changed(Bytes),
    /// As `Changed`, and answered once the node listens on the channel (a
    /// recover waits for it: what Redis publishes from then on reaches it).
    Confirm(Bytes, oneshot::Sender<()>),
}

/// This node's number, from the node counter.
pub(super) async fn node_number_from(commands: &mut ConnectionManager) -> RedisResult<u16> {
    let n: u64 = redis::cmd("INCR")
        .arg(NODE_COUNTER)
        .query_async(commands)
        .await?;
    Ok(node_number(n))
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
            // Its own broadcasts were delivered locally already (a client's
            // carry `CLIENT_ORIGIN`, which is no node's).
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
