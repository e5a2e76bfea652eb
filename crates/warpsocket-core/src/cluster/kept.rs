//! History channels in Redis (docs/api.md#history): Redis is the cluster's
//! sequencer. One Lua script per batch of the publisher gives each message
//! its channel's next offset, keeps it and publishes it, atomically; another
//! reads a channel's epoch, last offset and kept messages in one step.
//!
//! Per channel, a hash (`e`: the epoch, `o`: the last offset) and a list of
//! the kept messages, oldest first, each `millis:` then the kind byte and
//! the data; both expire `ttl` after the last message, so a sequence with no
//! message for `ttl` is gone and the next one has a new epoch. The list
//! holds consecutive offsets ending at `o`, so a message's offset follows
//! from its place. Epochs are Redis's clock and a counter: unique even after
//! Redis lost its data.

use std::sync::LazyLock;

use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::{Script, Value};

use super::wire::{decode_kept, history_keys, pubsub_key, EPOCH_COUNTER};
use crate::history::{Message, Policy};

/// Sequences a batch of messages, for any number of channels: KEYS are each
/// channel's meta hash and list; ARGV, per channel in the same order: size,
/// ttl in ms, the pub/sub channel, the number of messages, then their bodies
/// (kind byte and data), oldest first. One call per batch, not per message:
/// calling a script costs Redis far more than the few commands each message
/// needs (one `PUBLISH`, its share of one `RPUSH`), and the per-channel steps
/// (the offset, trimming, expiry) are done once per channel.
pub(super) static SEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"local t = redis.call('TIME')
local kept_at = string.format('%d:', t[1] * 1000 + math.floor(t[2] / 1000))
local a = 1
for c = 1, #KEYS, 2 do
  local meta, list = KEYS[c], KEYS[c + 1]
  local size, ttl, pubsub, count = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  a = a + 4
  local epoch = redis.call('HGET', meta, 'e')
  if not epoch then
    epoch = t[1] .. '.' .. t[2] .. '.' .. redis.call('INCR', '{EPOCH_COUNTER}')
    redis.call('HSET', meta, 'e', epoch)
    redis.call('DEL', list)
  end
  local first = redis.call('HINCRBY', meta, 'o', count) - count + 1
  local entries = {{}}
  for i = 0, count - 1 do
    local body = ARGV[a + i]
    redis.call('PUBLISH', pubsub, epoch .. '\0' .. string.format('%d', first + i) .. '\0' .. body)
    if i >= count - size then entries[#entries + 1] = kept_at .. body end
  end
  redis.call('RPUSH', list, unpack(entries))
  redis.call('LTRIM', list, -size, -1)
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', list, ttl)
  a = a + count
end
return 1"
    ))
});

/// KEYS: meta hash, list. ARGV: ttl in ms, since, limit (-1: all), the
/// epoch the caller wants messages of ('' for any). Drops the expired
/// messages, starts a sequence if there is none, and returns the epoch, the
/// last offset, the first kept offset, then the kept messages after `since`
/// (none when the epoch is not the wanted one).
static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = t[1] .. '.' .. t[2] .. '.' .. redis.call('INCR', '{EPOCH_COUNTER}')
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
  return {{epoch, 0, 1}}
end
local last = tonumber(redis.call('HGET', KEYS[1], 'o') or '0')
local ttl = tonumber(ARGV[1])
local expired = 0
while true do
  local head = redis.call('LINDEX', KEYS[2], expired)
  if not head then break end
  local at = tonumber(string.match(head, '^(%d+):'))
  if at and at + ttl > now then break end
  expired = expired + 1
end
if expired > 0 then redis.call('LTRIM', KEYS[2], expired, -1) end
local n = redis.call('LLEN', KEYS[2])
local first = last - n + 1
local reply = {{epoch, last, first}}
if ARGV[4] ~= '' and ARGV[4] ~= epoch then return reply end
local from = math.max(tonumber(ARGV[2]) + 1, first) - first
local limit = tonumber(ARGV[3])
if from < n and limit ~= 0 then
  local to = n - 1
  if limit > 0 then to = math.min(to, from + limit - 1) end
  local kept = redis.call('LRANGE', KEYS[2], from, to)
  for i = 1, #kept do reply[#reply + 1] = kept[i] end
end
return reply"
    ))
});

/// Loads the scripts into Redis's script cache: the publisher runs them by
/// hash in its pipelines, and Redis forgets them when it restarts.
pub(super) async fn load(commands: &mut ConnectionManager) -> redis::RedisResult<()> {
    for script in [&SEND, &READ] {
        script.load_async(commands).await?;
    }
    Ok(())
}

/// Messages for history channels, grouped by channel in first-seen order
/// (each channel's in the order sent), for one [`SEND`].
#[derive(Default)]
pub(super) struct Batch<'a> {
    channels: Vec<Group<'a>>,
}

struct Group<'a> {
    name: &'a [u8],
    policy: &'a Policy,
    bodies: Vec<&'a [u8]>,
}

impl<'a> Batch<'a> {
    pub(super) fn add(&mut self, name: &'a [u8], policy: &'a Policy, body: &'a [u8]) {
        // A batch is at most a few hundred messages over few channels.
        match self.channels.iter_mut().find(|group| group.name == name) {
            Some(group) => group.bodies.push(body),
            None => self.channels.push(Group {
                name,
                policy,
                bodies: vec![body],
            }),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// Adds the batch's one [`SEND`] to a pipeline.
    pub(super) fn add_to(&self, pipe: &mut redis::Pipeline) {
        let cmd = pipe.cmd("EVALSHA");
        cmd.arg(SEND.get_hash()).arg(self.channels.len() * 2);
        for group in &self.channels {
            let [meta, list] = history_keys(group.name);
            cmd.arg(meta).arg(list);
        }
        for group in &self.channels {
            cmd.arg(group.policy.size.min(1 << 50))
                .arg(ttl_ms(group.policy))
                .arg(&pubsub_key(group.name, true)[..])
                .arg(group.bodies.len());
            for body in &group.bodies {
                cmd.arg(*body);
            }
        }
        pipe.ignore();
    }
}

/// A history channel as a read found it.
#[derive(Debug)]
pub(crate) struct Read {
    pub(crate) epoch: Bytes,
    /// The offset of the last message (0: none yet).
    pub(crate) last: u64,
    /// The offset of the oldest kept message (`last + 1` when none is).
    pub(crate) first: u64,
    /// The kept messages asked for, oldest first.
    pub(crate) kept: Vec<Message>,
}

impl Read {
    /// True when a client that last saw `offset` of `epoch` missed nothing
    /// that is not kept (as `history::Log::recoverable`).
    pub(crate) fn recoverable(&self, epoch: &[u8], offset: u64) -> bool {
        *self.epoch == *epoch && offset <= self.last && offset.saturating_add(1) >= self.first
    }
}

/// Reads `name`'s sequence, and its kept messages after `since` (at most
/// `limit`; those of `epoch` only, when given).
pub(super) async fn read(
    commands: &mut ConnectionManager,
    name: &[u8],
    policy: &Policy,
    since: u64,
    limit: usize,
    epoch: Option<&[u8]>,
) -> redis::RedisResult<Read> {
    let [meta, list] = history_keys(name);
    // Lua's numbers are doubles: an unbounded limit is spelled -1.
    let limit = i64::try_from(limit)
        .ok()
        .filter(|&l| l < 1 << 50)
        .unwrap_or(-1);
    let reply: Value = READ
        .key(meta)
        .key(list)
        .arg(ttl_ms(policy))
        .arg(since)
        .arg(limit)
        .arg(epoch.unwrap_or_default())
        .invoke_async(commands)
        .await?;
    parse(reply, since).ok_or_else(|| {
        redis::RedisError::from((
            redis::ErrorKind::TypeError,
            "unexpected reply from the history script",
        ))
    })
}

/// The script's reply; the first message it returns (if any) is the one
/// after `since`, or the oldest kept.
fn parse(reply: Value, since: u64) -> Option<Read> {
    let Value::Array(items) = reply else {
        return None;
    };
    let mut items = items.into_iter();
    let epoch = match items.next()? {
        Value::BulkString(epoch) => Bytes::from(epoch),
        _ => return None,
    };
    let mut number = || match items.next() {
        Some(Value::Int(n)) => u64::try_from(n).ok(),
        _ => None,
    };
    let last = number()?;
    let first = number()?;
    let mut kept = Vec::with_capacity(items.len());
    for (offset, item) in (since.saturating_add(1).max(first)..).zip(items) {
        let Value::BulkString(entry) = item else {
            return None;
        };
        let (kind, data) = decode_kept(&entry)?;
        kept.push((offset, kind, Bytes::copy_from_slice(data)));
    }
    Some(Read {
        epoch,
        last,
        first,
        kept,
    })
}

fn ttl_ms(policy: &Policy) -> u64 {
    u64::try_from(policy.ttl.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, 1 << 50)
}
