//! Presence across a cluster (docs/api.md#presence): Redis decides every
//! join and leave of the cluster, once, in Lua scripts.
//!
//! Each node keeps its own sockets' presence in the hub's table, and tells
//! Redis only what changes per node: a member's first socket here (and every
//! track, for the info) and its last. Keys:
//!
//! - `warpsocket:p:CHANNEL`, a hash: member → how many nodes it is present
//!   through (a member is present while that is above 0);
//! - `warpsocket:pi:CHANNEL`, a hash: member → the info of its latest track
//!   (a kind byte, `t` or `b`, then the data);
//! - `warpsocket:pn:NODE`, a set: the (channel, member) pairs node `NODE`
//!   holds, each `LEN:CHANNELMEMBER` (`LEN`: the channel's length), so that
//!   a dead node's share can be taken back;
//! - `warpsocket:alive`, a sorted set: node → the time (Redis's clock, ms)
//!   after which it counts as dead.
//!
//! One task per node ([`run`]) sends the node's changes in their order, one
//! script per batch, and reports what Redis decided to the worker of the
//! socket that caused it. Every [`BEAT`] it moves its node's deadline
//! [`DEAD_AFTER`] on and takes back the shares of nodes past theirs (one
//! node's script does it, so each leave is reported once, by a live node);
//! and when Redis lost what the node holds (it restarted, or swept the node
//! while it could not reach Redis) or a change did not reach it, it tells
//! Redis again everything the node holds, which Redis compares with what it
//! has.
//!
//! Keys are named in the scripts (a dead node's channels are known only
//! there): one Redis server, not Redis Cluster.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as sync_mpsc, Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::{RedisResult, Script};
use tokio::sync::{mpsc, oneshot, watch};

use super::conn::{stopped, Conn, REDIS_TIMEOUT};
use crate::errors::Unreachable;
use crate::hub::{Answer, Hub, PresenceSink};
use crate::presence::{Change, Info, Members};
use crate::socket::Socket;

/// How often a node beats.
const BEAT: Duration = Duration::from_secs(2);
/// A node that has not beaten for this long is dead: its members leave
/// within `DEAD_AFTER + BEAT` (the API promises 15 s).
const DEAD_AFTER: Duration = Duration::from_secs(10);
const BATCH: usize = 256;
const QUEUE_CAPACITY: usize = 65_536;

/// What the scripts share: splitting a node's entry, and one node fewer
/// holding a member (true if that was the member's last node).
const PRELUDE: &str = r"local function split(entry)
  local colon = string.find(entry, ':', 1, true)
  local n = tonumber(string.sub(entry, 1, colon - 1))
  return string.sub(entry, colon + 1, colon + n), string.sub(entry, colon + n + 1)
end
local function fewer(channel, member)
  local key = 'warpsocket:p:' .. channel
  if redis.call('HINCRBY', key, member, -1) <= 0 then
    redis.call('HDEL', key, member)
    redis.call('HDEL', 'warpsocket:pi:' .. channel, member)
    return true
  end
  return false
end
local function more(node, channel, member)
  if redis.call('SADD', 'warpsocket:pn:' .. node, #channel .. ':' .. channel .. member) == 0 then
    return false
  end
  return redis.call('HINCRBY', 'warpsocket:p:' .. channel, member, 1) == 1
end
local function set_info(channel, member, info)
  if info == '' then
    redis.call('HDEL', 'warpsocket:pi:' .. channel, member)
  else
    redis.call('HSET', 'warpsocket:pi:' .. channel, member, info)
  end
end
";

/// ARGV: the node, then per change `T` (a track) or `L` (the member's last
/// socket here left), channel, member, info (`''` for none; ignored for
/// `L`). Returns per change 1 if the member joined (`T`) or left (`L`) the
/// cluster, else 0.
static CHANGES: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PRELUDE}
local node = ARGV[1]
local done = {{}}
for i = 2, #ARGV, 4 do
  local channel, member = ARGV[i + 1], ARGV[i + 2]
  local changed = false
  if ARGV[i] == 'T' then
    changed = more(node, channel, member)
    set_info(channel, member, ARGV[i + 3])
  elseif redis.call('SREM', 'warpsocket:pn:' .. node, #channel .. ':' .. channel .. member) == 1 then
    changed = fewer(channel, member)
  end
  done[#done + 1] = changed and 1 or 0
end
return done"
    ))
});

/// ARGV: the node, `1` if it is leaving the cluster (else `0`), then per
/// (channel, member) it holds: channel, member, info. Makes Redis hold what
/// the node holds: returns the (channel, member) pairs that joined the
/// cluster, then those that left, each flat.
static SYNC: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PRELUDE}
local node = ARGV[1]
local held = 'warpsocket:pn:' .. node
local wanted, joined, left = {{}}, {{}}, {{}}
for i = 3, #ARGV, 3 do
  local channel, member = ARGV[i], ARGV[i + 1]
  wanted[#channel .. ':' .. channel .. member] = true
  if more(node, channel, member) then
    set_info(channel, member, ARGV[i + 2])
    joined[#joined + 1] = channel
    joined[#joined + 1] = member
  end
end
for _, entry in ipairs(redis.call('SMEMBERS', held)) do
  if not wanted[entry] then
    redis.call('SREM', held, entry)
    local channel, member = split(entry)
    if fewer(channel, member) then
      left[#left + 1] = channel
      left[#left + 1] = member
    end
  end
end
if ARGV[2] == '1' then
  redis.call('ZREM', 'warpsocket:alive', node)
end
return {{joined, left}}"
    ))
});

/// ARGV: the node, how long it stays alive (ms). Moves its deadline on and
/// takes back the shares of the nodes past theirs. Returns 1 if Redis did
/// not know the node alive (so it may not hold what the node holds), then
/// the (channel, member) pairs that left the cluster, flat.
static BEAT_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PRELUDE}
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local fresh = redis.call('ZADD', 'warpsocket:alive', now + tonumber(ARGV[2]), ARGV[1])
local left = {{}}
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', 'warpsocket:alive', '-inf', now)) do
  redis.call('ZREM', 'warpsocket:alive', dead)
  local held = 'warpsocket:pn:' .. dead
  for _, entry in ipairs(redis.call('SMEMBERS', held)) do
    local channel, member = split(entry)
    if fewer(channel, member) then
      left[#left + 1] = channel
      left[#left + 1] = member
    end
  end
  redis.call('DEL', held)
end
return {{fresh, left}}"
    ))
});

/// KEYS: a channel's member hash and info hash. Returns its members, then
/// its infos as a flat member, info list.
static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(r"return {redis.call('HKEYS', KEYS[1]), redis.call('HGETALL', KEYS[2])}")
});

fn members_key(channel: &[u8]) -> Vec<u8> {
    [b"warpsocket:p:", channel].concat()
}

fn info_key(channel: &[u8]) -> Vec<u8> {
    [b"warpsocket:pi:", channel].concat()
}

fn encode_info(info: Option<&Info>) -> Vec<u8> {
    match info {
        None => Vec::new(),
        Some(Info::Text(text)) => [b"t", &text[..]].concat(),
        Some(Info::Binary(data)) => [b"b", &data[..]].concat(),
    }
}

fn decode_info(stored: &[u8]) -> Option<Info> {
    let (kind, data) = stored.split_first()?;
    let data = Bytes::copy_from_slice(data);
    match kind {
        b't' => Some(Info::Text(data)),
        b'b' => Some(Info::Binary(data)),
        _ => None,
    }
}

/// The members present in `channel` across the cluster, with their info.
pub(super) fn members(conn: &Conn, channel: &[u8]) -> Result<Members, Unreachable> {
    let mut commands = conn.commands.clone();
    let (members, infos) = (members_key(channel), info_key(channel));
    let (names, infos): (Vec<Vec<u8>>, Vec<Vec<u8>>) = conn.wait(async move {
        READ.key(members)
            .key(infos)
            .invoke_async(&mut commands)
            .await
    })?;
    let mut info_of = std::collections::HashMap::with_capacity(infos.len() / 2);
    for pair in infos.chunks_exact(2) {
        info_of.insert(&pair[0][..], &pair[1][..]);
    }
    Ok(names
        .iter()
        .map(|name| {
            let info = info_of
                .get(&name[..])
                .and_then(|stored| decode_info(stored));
            (Arc::from(String::from_utf8_lossy(name)), info)
        })
        .collect())
}

/// How many members are present in `channel` across the cluster.
pub(super) fn count(conn: &Conn, channel: &[u8]) -> Result<usize, Unreachable> {
    let mut commands = conn.commands.clone();
    let key = members_key(channel);
    conn.wait(async move { redis::cmd("HLEN").arg(key).query_async(&mut commands).await })
}

/// What the node's task is asked to do, in order.
pub(super) enum Op {
    /// A socket was tracked (`answer`: whether its member joined the cluster).
    Track {
        socket: Arc<Socket>,
        channel: Bytes,
        member: Arc<str>,
        info: Option<Info>,
        answer: sync_mpsc::Sender<bool>,
    },
    /// A member's last socket here left (`answer`: whether it left the cluster).
    Leave {
        socket: Arc<Socket>,
        change: Change,
        answer: sync_mpsc::Sender<bool>,
    },
    /// Everything the node holds, for Redis to compare with what it has.
    Sync(Vec<(Bytes, Arc<str>, Option<Info>)>),
    /// The node leaves the cluster: what it holds goes.
    Depart(oneshot::Sender<()>),
}

/// The hub's [`PresenceSink`] on a cluster node: hands the changes to the
/// node's task, in order.
pub(super) struct Sink {
    queue: mpsc::Sender<Op>,
    /// The node's pub/sub connection is up: while it is down, changes are
    /// not queued (they would wait for a timeout each) but resynced later.
    up: Arc<AtomicBool>,
    resync: Arc<AtomicBool>,
}

impl Sink {
    /// Queues `op`; when it cannot be, Redis is told everything later.
    fn queue(&self, op: Op) {
        if !self.up.load(Ordering::Acquire) || self.queue.try_send(op).is_err() {
            self.resync.store(true, Ordering::Release);
        }
    }
}

impl PresenceSink for Sink {
    fn tracked(
        &self,
        socket: &Arc<Socket>,
        channel: Bytes,
        member: Arc<str>,
        info: Option<Info>,
    ) -> Answer {
        let (answer, answered) = sync_mpsc::channel();
        self.queue(Op::Track {
            socket: socket.clone(),
            channel,
            member,
            info,
            answer,
        });
        answered
    }

    fn left(&self, socket: &Arc<Socket>, change: Change) -> Answer {
        let (answer, answered) = sync_mpsc::channel();
        self.queue(Op::Leave {
            socket: socket.clone(),
            change,
            answer,
        });
        answered
    }

    fn wait(&self, answer: Answer) -> bool {
        answer.recv_timeout(REDIS_TIMEOUT).unwrap_or(false)
    }

    fn resync(&self) {
        self.resync.store(true, Ordering::Release);
    }
}

/// A node's presence task and the sink that feeds it.
pub(super) struct Node {
    hub: Arc<Hub>,
    node: u16,
    commands: ConnectionManager,
    ops: mpsc::Receiver<Op>,
    queue: mpsc::Sender<Op>,
    resync: Arc<AtomicBool>,
}

/// Hands the node's presence to its task from now on; the task must be
/// spawned ([`run`]) for anything to reach Redis. Returns a sender for
/// [`depart`].
pub(super) fn install(
    hub: Arc<Hub>,
    node: u16,
    commands: ConnectionManager,
    up: Arc<AtomicBool>,
) -> (Node, mpsc::Sender<Op>) {
    let (queue, ops) = mpsc::channel(QUEUE_CAPACITY);
    // Redis may still hold a share of an earlier node of this number.
    let resync = Arc::new(AtomicBool::new(true));
    hub.set_presence_sink(Some(Box::new(Sink {
        queue: queue.clone(),
        up,
        resync: resync.clone(),
    })));
    let node = Node {
        hub,
        node,
        commands,
        ops,
        queue: queue.clone(),
        resync,
    };
    (node, queue)
}

/// Takes the node's presence out of the cluster (its members there leave,
/// unreported: the node is stopping) once everything queued before went
/// to Redis. From a thread outside the runtime; bounded by `REDIS_TIMEOUT`.
pub(super) fn depart(hub: &Hub, queue: &mpsc::Sender<Op>, runtime: &tokio::runtime::Handle) {
    hub.set_presence_sink(None);
    let (done, departed) = oneshot::channel();
    if queue.try_send(Op::Depart(done)).is_ok() {
        runtime.block_on(async {
            let _ = tokio::time::timeout(REDIS_TIMEOUT, departed).await;
        });
    }
}

/// The node's presence task: see the module's doc.
pub(super) async fn run(mut node: Node, mut stop: watch::Receiver<bool>) {
    let mut beat = tokio::time::interval(BEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            n = node.ops.recv_many(&mut batch, BATCH) => if n == 0 { return },
            _ = beat.tick() => {
                node.beat().await;
                continue;
            }
            _ = stopped(&mut stop) => return,
        }
        let mut changes = Vec::new();
        for op in batch.drain(..) {
            match op {
                Op::Track { .. } | Op::Leave { .. } => changes.push(op),
                Op::Sync(held) => {
                    node.send_changes(std::mem::take(&mut changes)).await;
                    node.sync(held, false).await;
                }
                Op::Depart(done) => {
                    node.send_changes(std::mem::take(&mut changes)).await;
                    node.sync(Vec::new(), true).await;
                    let _ = done.send(());
                    return;
                }
            }
        }
        node.send_changes(changes).await;
    }
}

impl Node {
    /// Sends a run of tracks and leaves in one script; reports each change
    /// of the cluster to the worker of the socket that caused it.
    async fn send_changes(&mut self, changes: Vec<Op>) {
        if changes.is_empty() {
            return;
        }
        let mut invocation = CHANGES.prepare_invoke();
        invocation.arg(self.node);
        for op in &changes {
            match op {
                Op::Track {
                    channel,
                    member,
                    info,
                    ..
                } => invocation
                    .arg("T")
                    .arg(&channel[..])
                    .arg(member.as_bytes())
                    .arg(encode_info(info.as_ref())),
                Op::Leave { change, .. } => invocation
                    .arg("L")
                    .arg(&change.channel[..])
                    .arg(change.member.as_bytes())
                    .arg(""),
                Op::Sync(_) | Op::Depart(_) => continue,
            };
        }
        let sent = bounded(invocation.invoke_async::<Vec<i64>>(&mut self.commands)).await;
        let done = match sent {
            Ok(done) if done.len() == changes.len() => done,
            outcome => {
                // Whether Redis applied them is unknown: it is told again.
                log::debug!(target: "warpsocket", "cluster presence: {} changes not confirmed: {outcome:?}", changes.len());
                self.resync.store(true, Ordering::Release);
                return;
            }
        };
        for (op, changed) in changes.into_iter().zip(done) {
            let changed = changed == 1;
            let (socket, change, answer) = match op {
                Op::Track {
                    socket,
                    channel,
                    member,
                    answer,
                    ..
                } => (
                    socket,
                    Change {
                        channel,
                        member,
                        joined: true,
                    },
                    answer,
                ),
                Op::Leave {
                    socket,
                    change,
                    answer,
                } => (socket, change, answer),
                Op::Sync(_) | Op::Depart(_) => continue,
            };
            if changed {
                Hub::report_presence(vec![(socket, change)]);
            }
            let _ = answer.send(changed);
        }
    }

    /// Makes Redis hold what the node holds (nothing, when `departing`);
    /// reports the cluster's changes that made to any worker here.
    async fn sync(&mut self, held: Vec<(Bytes, Arc<str>, Option<Info>)>, departing: bool) {
        let mut invocation = SYNC.prepare_invoke();
        invocation
            .arg(self.node)
            .arg(if departing { "1" } else { "0" });
        for (channel, member, info) in &held {
            invocation
                .arg(&channel[..])
                .arg(member.as_bytes())
                .arg(encode_info(info.as_ref()));
        }
        type Pairs = Vec<Vec<u8>>;
        match bounded(invocation.invoke_async::<(Pairs, Pairs)>(&mut self.commands)).await {
            Ok((joined, left)) if !departing => {
                self.report(&joined, true);
                self.report(&left, false);
            }
            Ok(_) => {}
            Err(e) => {
                log::debug!(target: "warpsocket", "cluster presence: resync failed: {e}");
                self.resync.store(true, Ordering::Release);
            }
        }
    }

    /// Keeps the node alive, takes back dead nodes' shares, and asks for a
    /// resync when Redis may not hold what the node holds.
    async fn beat(&mut self) {
        let mut invocation = BEAT_SCRIPT.prepare_invoke();
        invocation.arg(self.node).arg(DEAD_AFTER.as_millis() as u64);
        match bounded(invocation.invoke_async::<(i64, Vec<Vec<u8>>)>(&mut self.commands)).await {
            Ok((fresh, left)) => {
                self.report(&left, false);
                if fresh == 1 {
                    self.resync.store(true, Ordering::Release);
                }
            }
            Err(e) => {
                log::debug!(target: "warpsocket", "cluster presence: beat failed: {e}");
                return;
            }
        }
        if self.resync.swap(false, Ordering::AcqRel) {
            // Queued with the table locked: after every change made before
            // the snapshot, before every change made after it.
            let queue = &self.queue;
            let resync = &self.resync;
            self.hub.presence_snapshot(|held| {
                if queue.try_send(Op::Sync(held)).is_err() {
                    resync.store(true, Ordering::Release);
                }
            });
        }
    }

    /// Reports flat (channel, member) pairs as joins or leaves.
    fn report(&self, pairs: &[Vec<u8>], joined: bool) {
        if pairs.is_empty() {
            return;
        }
        let changes = pairs
            .chunks_exact(2)
            .map(|pair| Change {
                channel: Bytes::copy_from_slice(&pair[0]),
                member: Arc::from(String::from_utf8_lossy(&pair[1])),
                joined,
            })
            .collect();
        self.hub.report_presence_anywhere(changes);
    }
}

async fn bounded<T>(call: impl std::future::Future<Output = RedisResult<T>>) -> RedisResult<T> {
    match tokio::time::timeout(REDIS_TIMEOUT, call).await {
        Ok(outcome) => outcome,
        Err(_) => Err(redis::RedisError::from((
            redis::ErrorKind::IoError,
            "no answer in time",
        ))),
    }
}
