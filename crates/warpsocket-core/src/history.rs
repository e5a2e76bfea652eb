//! History channels (docs/api.md#history): per channel whose name a policy
//! covers, the sequence of offsets, its epoch, and the last messages kept.
//!
//! A channel's [`Log`] sits behind its own mutex, which is the channel's
//! sequencer: the hub takes an offset and queues every recipient's frame
//! while holding it, and a recover subscribes and queues the kept messages
//! while holding it, so every outbox gets the channel's messages in offset
//! order and a recovering client gets each message exactly once.
//!
//! Memory: a log keeps at most `size` messages, each for `ttl`. Expired
//! messages are dropped whenever a log is used, a sequence without a message
//! for `ttl` restarts (a new epoch, offset 0) when next used, and
//! [`History::sweep`] (from the server's keepalive task, at most once per
//! [`SWEEP_EVERY_MS`]) drops whole logs that expired, so a channel's memory
//! is returned within about a second of its history expiring.
//!
//! Times are the milliseconds of `clock::now_ms`, passed in by the caller
//! where it matters, so the rules here are tested without sleeping.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use parking_lot::Mutex;

use crate::clock;
use crate::frame::Kind;
use crate::shards::Shards;

/// How long the sweep waits between two walks over every log.
pub(crate) const SWEEP_EVERY_MS: u64 = 1000;

/// What a history channel keeps, and whether its deliveries are stamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Messages kept (the latest ones); at least 1.
    pub size: usize,
    /// How long each message is kept, and how long a sequence lives without
    /// a message.
    pub ttl: Duration,
    /// Deliveries carry the offset: `17:` before the data.
    pub stamp: bool,
}

/// Which channels keep history: name prefixes (compared as bytes) and their
/// policies; the longest matching prefix wins, `""` matches every channel.
#[derive(Debug, Clone, Default)]
pub struct Policies(Vec<(Bytes, Policy)>);

impl Policies {
    /// Of two equal prefixes, the later one wins (as a Python dict would).
    pub fn new(rules: impl IntoIterator<Item = (Bytes, Policy)>) -> Self {
        let mut unique: Vec<(Bytes, Policy)> = Vec::new();
        for (prefix, policy) in rules {
            unique.retain(|(p, _)| *p != prefix);
            unique.push((prefix, policy));
        }
        // Longest first: the first match is then the longest.
        unique.sort_by_key(|rule| std::cmp::Reverse(rule.0.len()));
        Policies(unique)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The policy covering `channel`, if any.
    pub(crate) fn find(&self, channel: &[u8]) -> Option<Policy> {
        self.0
            .iter()
            .find(|(prefix, _)| channel.starts_with(prefix))
            .map(|(_, policy)| *policy)
    }
}

/// A kept message as `history()` returns it: its offset, kind and data.
pub type Message = (u64, Kind, Bytes);

/// One kept message: the data as sent, before any prefix or stamp.
///
/// 32 bytes and the data's own allocation: its offset follows from its place
/// in the log, and the data is a boxed slice (16 bytes) rather than a
/// reference-counted `Bytes` (32), as only the log owns it.
pub(crate) struct Kept {
    pub(crate) data: Box<[u8]>,
    /// When it was sent.
    at: u64,
    pub(crate) kind: Kind,
}

/// One history channel's sequence and kept messages. Lock it (see the
/// module's doc) and bring it up to date with [`History::refresh`] before
/// reading it.
pub(crate) struct Log {
    policy: Policy,
    ttl_ms: u64,
    epoch: Arc<str>,
    /// The offset of the last message, 0 before the first.
    last: u64,
    /// Consecutive offsets, oldest first, ending at `last`.
    kept: VecDeque<Kept>,
    /// When the last message was sent, or the sequence began: it ends `ttl`
    /// after that.
    touched: u64,
    /// Out of the map (the policies changed): no longer counted.
    retired: bool,
}

impl Log {
    fn new(policy: Policy, epoch: Arc<str>, now: u64) -> Log {
        // At least 1 ms: a sequence that ends the moment it begins would
        // never hand out an offset anyone could recover from.
        let ttl_ms = u64::try_from(policy.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        Log {
            policy,
            ttl_ms,
            epoch,
            last: 0,
            kept: VecDeque::new(),
            touched: now,
            retired: false,
        }
    }

    pub(crate) fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    /// The offset of the channel's last message, 0 if none yet.
    pub(crate) fn last(&self) -> u64 {
        self.last
    }

    /// Deliveries carry the offset.
    pub(crate) fn stamps(&self) -> bool {
        self.policy.stamp
    }

    /// The offset of the oldest kept message (`last + 1` when none is kept).
    fn first(&self) -> u64 {
        self.last + 1 - self.kept.len() as u64
    }

    /// The kept messages with an offset above `since` and their offsets,
    /// oldest first.
    pub(crate) fn after(&self, since: u64) -> impl Iterator<Item = (u64, &Kept)> {
        // Offsets are consecutive, so the first wanted one is found by index.
        let first = self.first();
        let skip = since.saturating_add(1).saturating_sub(first);
        (first..)
            .zip(self.kept.iter())
            .skip(usize::try_from(skip).unwrap_or(usize::MAX))
    }

    /// True when a client that last saw `offset` of `epoch` missed nothing
    /// that is not kept: same epoch, the offset not above the last, and
    /// every message after it still kept.
    pub(crate) fn recoverable(&self, epoch: &str, offset: u64) -> bool {
        *self.epoch == *epoch && offset <= self.last && offset.saturating_add(1) >= self.first()
    }

    /// No message for `ttl`: the sequence is over.
    fn expired(&self, now: u64) -> bool {
        now >= self.touched.saturating_add(self.ttl_ms)
    }
}

/// A stamped delivery's stamp: the offset in ASCII decimal and `:`, which
/// goes after a virtual socket's prefix and before the data. Built on the
/// stack, and by hand: `write!` goes through the formatting machinery, a
/// measurable part of a history send.
pub(crate) struct Stamp {
    bytes: [u8; 21],
    start: usize,
}

impl Stamp {
    pub(crate) fn new(offset: u64) -> Stamp {
        let mut bytes = [0u8; 21];
        let mut start = bytes.len() - 1;
        bytes[start] = b':';
        let mut rest = offset;
        loop {
            start -= 1;
            bytes[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        Stamp { bytes, start }
    }
}

impl std::ops::Deref for Stamp {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

/// Hands out epochs: a token for this process (its start time and pid)
/// and a counter, so no two sequences of any process share one.
struct Epochs {
    process: String,
    next: AtomicU64,
}

impl Default for Epochs {
    fn default() -> Self {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Epochs {
            process: format!("{:x}.{:x}", nanos as u64, std::process::id()),
            next: AtomicU64::new(1),
        }
    }
}

impl Epochs {
    fn next(&self) -> Arc<str> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}.{n}", self.process).into()
    }
}

/// Every history channel of the process.
#[derive(Default)]
pub(crate) struct History {
    /// False while no policy is set: a send to any channel then pays one
    /// relaxed load for history, nothing more.
    enabled: AtomicBool,
    policies: ArcSwap<Policies>,
    /// Sharded like the channels: unrelated channels rarely share a lock,
    /// and a shard's lock is held only to find or insert a log.
    logs: Shards<Mutex<HashMap<Bytes, Arc<Mutex<Log>>>>>,
    epochs: Epochs,
    channels: AtomicUsize,
    messages: AtomicUsize,
    next_sweep: AtomicU64,
}

impl History {
    /// Sets the policies, forgetting every log: the sequences that follow
    /// have new epochs (a server started after another stopped).
    pub(crate) fn configure(&self, policies: Policies) {
        self.enabled.store(false, Ordering::Relaxed);
        for shard in self.logs.iter() {
            let logs: Vec<_> = shard.lock().drain().collect();
            for (_, log) in logs {
                // A sender may still hold it: it must no longer count.
                let mut log = log.lock();
                self.retire(&mut log);
            }
        }
        let enabled = !policies.is_empty();
        self.policies.store(Arc::new(policies));
        self.enabled.store(enabled, Ordering::Release);
    }

    /// The policy covering `channel`, if any.
    pub(crate) fn policy(&self, channel: &[u8]) -> Option<Policy> {
        if !self.enabled.load(Ordering::Acquire) {
            return None;
        }
        self.policies.load().find(channel)
    }

    /// The log of `channel`, made (with a new epoch) if it has none; None
    /// when no policy covers the channel.
    #[inline]
    pub(crate) fn log(&self, channel: &[u8]) -> Option<Arc<Mutex<Log>>> {
        if !self.enabled.load(Ordering::Acquire) {
            return None;
        }
        self.covered_log(channel, None)
    }

    /// [`log`](Self::log) once history is on; `now` for a test's clock.
    fn covered_log(&self, channel: &[u8], now: Option<u64>) -> Option<Arc<Mutex<Log>>> {
        let policy = self.policies.load().find(channel)?;
        let mut shard = self.logs.shard(channel).lock();
        if let Some(log) = shard.get(channel) {
            return Some(log.clone());
        }
        let now = now.unwrap_or_else(clock::now_ms);
        let log = Arc::new(Mutex::new(Log::new(policy, self.epochs.next(), now)));
        shard.insert(Bytes::copy_from_slice(channel), log.clone());
        self.channels.fetch_add(1, Ordering::Relaxed);
        Some(log)
    }

    /// Brings a locked log up to `now`: an expired sequence restarts with a
    /// new epoch, expired messages are dropped.
    pub(crate) fn refresh(&self, log: &mut Log, now: u64) {
        if log.expired(now) {
            self.forget(log, log.kept.len());
            log.kept.clear();
            log.last = 0;
            log.epoch = self.epochs.next();
            log.touched = now;
            return;
        }
        let ttl = log.ttl_ms;
        let expired = log
            .kept
            .iter()
            .take_while(|kept| now >= kept.at.saturating_add(ttl))
            .count();
        log.kept.drain(..expired);
        self.forget(log, expired);
    }

    /// Appends a message to a locked log; returns its offset.
    pub(crate) fn push(&self, log: &mut Log, kind: Kind, data: &[u8], now: u64) -> u64 {
        self.refresh(log, now);
        log.last += 1;
        log.touched = now;
        if log.kept.len() >= log.policy.size {
            log.kept.pop_front();
            self.forget(log, 1);
        }
        if log.kept.len() == log.kept.capacity() {
            // Grow by doubling, as usual, but never past `size`: a full log
            // then holds no spare slots (a quarter of the ring, on average,
            // with plain doubling).
            let room = log
                .kept
                .len()
                .max(4)
                .min(log.policy.size.saturating_sub(log.kept.len()))
                .max(1);
            log.kept.reserve_exact(room);
        }
        log.kept.push_back(Kept {
            data: data.into(),
            at: now,
            kind,
        });
        if !log.retired {
            self.messages.fetch_add(1, Ordering::Relaxed);
        }
        log.last
    }

    /// `n` messages of `log` are gone.
    fn forget(&self, log: &Log, n: usize) {
        if !log.retired && n > 0 {
            self.messages.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// `log` left the map.
    fn retire(&self, log: &mut Log) {
        if !log.retired {
            self.forget(log, log.kept.len());
            self.channels.fetch_sub(1, Ordering::Relaxed);
            log.retired = true;
        }
    }

    /// Drops the logs whose sequence expired and the expired messages of
    /// the others, at most once per [`SWEEP_EVERY_MS`] whoever calls.
    pub(crate) fn sweep(&self, now: u64) {
        let due = self.next_sweep.load(Ordering::Relaxed);
        if now < due
            || self
                .next_sweep
                .compare_exchange(
                    due,
                    now + SWEEP_EVERY_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        for shard in self.logs.iter() {
            shard.lock().retain(|_, log| {
                // A log in use is trimmed by its user; the sweep never waits
                // for a send holding it (and holds the shard meanwhile).
                let Some(mut locked) = log.try_lock() else {
                    return true;
                };
                // Only the map holds it: nobody can be about to use it,
                // since a new user clones it under the shard lock held here.
                if locked.expired(now) && Arc::strong_count(log) == 1 {
                    self.retire(&mut locked);
                    return false;
                }
                self.refresh(&mut locked, now);
                true
            });
        }
    }

    /// Channels with a log.
    pub(crate) fn channel_count(&self) -> usize {
        self.channels.load(Ordering::Relaxed)
    }

    /// Messages kept, over every channel.
    pub(crate) fn message_count(&self) -> usize {
        self.messages.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(size: usize, ttl_ms: u64) -> Policy {
        Policy {
            size,
            ttl: Duration::from_millis(ttl_ms),
            stamp: true,
        }
    }

    fn history(rules: &[(&str, Policy)]) -> History {
        let history = History::default();
        history.configure(Policies::new(
            rules
                .iter()
                .map(|(p, policy)| (Bytes::copy_from_slice(p.as_bytes()), *policy)),
        ));
        history
    }

    fn offsets(log: &Log, since: u64) -> Vec<u64> {
        log.after(since).map(|(offset, _)| offset).collect()
    }

    #[test]
    fn the_longest_matching_prefix_wins_and_the_empty_one_matches_all() {
        let rules = Policies::new([
            (Bytes::from_static(b""), policy(1, 10)),
            (Bytes::from_static(b"room:"), policy(2, 10)),
            (Bytes::from_static(b"room:vip"), policy(3, 10)),
            (Bytes::from_static(b"room:"), policy(4, 10)),
        ]);
        assert_eq!(rules.find(b"room:vip:1").map(|p| p.size), Some(3));
        assert_eq!(rules.find(b"room:1").map(|p| p.size), Some(4), "later wins");
        assert_eq!(rules.find(b"other").map(|p| p.size), Some(1));
        assert_eq!(rules.find(b"").map(|p| p.size), Some(1));
        let none = Policies::new([(Bytes::from_static(b"a"), policy(1, 10))]);
        assert_eq!(none.find(b"b"), None);
        assert_eq!(none.find("é".as_bytes()), None);
    }

    #[test]
    fn no_policy_no_log() {
        let h = History::default();
        assert!(h.log(b"room").is_none());
        let h = history(&[("room:", policy(2, 1000))]);
        assert!(h.log(b"lobby").is_none());
        assert!(h.log(b"room:1").is_some());
        assert_eq!(h.channel_count(), 1);
    }

    #[test]
    fn a_full_log_holds_no_spare_slots() {
        let h = history(&[("", policy(100, 1000))]);
        let log = h.covered_log(b"c", Some(1)).unwrap();
        let mut log = log.lock();
        for i in 0..250 {
            h.push(&mut log, Kind::Binary, b"x", 2 + i);
            assert!(log.kept.capacity() <= 100, "{}", log.kept.capacity());
        }
        assert_eq!(log.kept.len(), 100);
        assert_eq!(offsets(&log, 0), (151..=250).collect::<Vec<u64>>());
        assert_eq!(std::mem::size_of::<Kept>(), 32);
    }

    #[test]
    fn offsets_are_gapless_and_the_ring_keeps_the_last_size() {
        let h = history(&[("", policy(3, 1000))]);
        let log = h.covered_log(b"c", Some(1)).unwrap();
        let mut log = log.lock();
        let offsets_sent: Vec<u64> = (0..5)
            .map(|i| h.push(&mut log, Kind::Text, format!("m{i}").as_bytes(), 2 + i))
            .collect();
        assert_eq!(offsets_sent, [1, 2, 3, 4, 5]);
        assert_eq!(log.last(), 5);
        assert_eq!(offsets(&log, 0), [3, 4, 5]);
        assert_eq!(offsets(&log, 3), [4, 5]);
        assert_eq!(offsets(&log, 5), Vec::<u64>::new());
        assert_eq!(offsets(&log, u64::MAX), Vec::<u64>::new());
        assert_eq!(&log.after(4).next().unwrap().1.data[..], b"m4");
        assert_eq!(h.message_count(), 3);
    }

    #[test]
    fn recoverable_needs_the_same_epoch_no_gap_and_no_future() {
        let h = history(&[("", policy(3, 1000))]);
        let log = h.covered_log(b"c", Some(1)).unwrap();
        let mut log = log.lock();
        let epoch = log.epoch().clone();
        assert!(log.recoverable(&epoch, 0), "nothing sent, nothing missed");
        assert!(!log.recoverable(&epoch, 1), "above the last");
        for i in 0..5 {
            h.push(&mut log, Kind::Binary, b"x", 2 + i);
        }
        // Kept: 3, 4, 5.
        assert!(log.recoverable(&epoch, 5));
        assert!(log.recoverable(&epoch, 2), "3 onwards is kept");
        assert!(!log.recoverable(&epoch, 1), "2 is gone");
        assert!(!log.recoverable(&epoch, 6));
        assert!(!log.recoverable(&epoch, u64::MAX));
        assert!(!log.recoverable("another", 5));
    }

    #[test]
    fn messages_expire_one_by_one_and_the_sequence_after_ttl() {
        let h = history(&[("", policy(10, 100))]);
        let log = h.covered_log(b"c", Some(0)).unwrap();
        let mut log = log.lock();
        let epoch = log.epoch().clone();
        h.push(&mut log, Kind::Text, b"a", 0);
        h.push(&mut log, Kind::Text, b"b", 50);
        h.refresh(&mut log, 120);
        assert_eq!(offsets(&log, 0), [2], "the first expired at 100");
        assert_eq!(log.epoch(), &epoch);
        assert!(!log.recoverable(&epoch, 0));
        assert!(log.recoverable(&epoch, 1));
        assert_eq!(h.message_count(), 1);
        h.refresh(&mut log, 150);
        assert_ne!(log.epoch(), &epoch, "no message for ttl: a new sequence");
        assert_eq!((log.last(), log.kept.len()), (0, 0));
        assert_eq!(h.push(&mut log, Kind::Text, b"c", 151), 1);
        assert_eq!(h.message_count(), 1);
    }

    #[test]
    fn a_sequence_without_messages_expires_too() {
        let h = history(&[("", policy(10, 100))]);
        let log = h.covered_log(b"c", Some(0)).unwrap();
        let mut log = log.lock();
        let epoch = log.epoch().clone();
        h.refresh(&mut log, 99);
        assert_eq!(log.epoch(), &epoch);
        h.refresh(&mut log, 100);
        assert_ne!(log.epoch(), &epoch);
    }

    #[test]
    fn the_sweep_drops_expired_logs_not_those_in_use() {
        let h = history(&[("", policy(10, 100))]);
        let (a, b) = (
            h.covered_log(b"a", Some(0)).unwrap(),
            h.covered_log(b"b", Some(0)).unwrap(),
        );
        h.push(&mut a.lock(), Kind::Text, b"x", 0);
        h.push(&mut b.lock(), Kind::Text, b"x", 60);
        drop(a);
        assert_eq!((h.channel_count(), h.message_count()), (2, 2));
        h.sweep(130);
        assert_eq!(
            (h.channel_count(), h.message_count()),
            (1, 1),
            "a expired, b held"
        );
        h.sweep(1000);
        assert_eq!(h.channel_count(), 1, "at most once per SWEEP_EVERY_MS");
        h.sweep(130 + SWEEP_EVERY_MS);
        assert_eq!(
            (h.channel_count(), h.message_count()),
            (1, 0),
            "still held: trimmed, kept"
        );
        drop(b);
        h.sweep(130 + 2 * SWEEP_EVERY_MS);
        assert_eq!((h.channel_count(), h.message_count()), (0, 0));
    }

    #[test]
    fn configure_forgets_every_log_and_epochs_never_repeat() {
        let h = history(&[("", policy(10, 1000))]);
        let log = h.log(b"c").unwrap();
        let first = log.lock().epoch().clone();
        h.push(&mut log.lock(), Kind::Text, b"x", clock::now_ms());
        h.configure(Policies::new([(Bytes::new(), policy(10, 1000))]));
        assert_eq!((h.channel_count(), h.message_count()), (0, 0));
        // A sender still holding the old log no longer counts.
        h.push(&mut log.lock(), Kind::Text, b"x", clock::now_ms());
        assert_eq!(h.message_count(), 0);
        let again = h.log(b"c").unwrap();
        assert_ne!(again.lock().epoch(), &first);
        h.configure(Policies::default());
        assert!(h.log(b"c").is_none());
    }

    #[test]
    fn stamps_are_the_offset_in_decimal_and_a_colon() {
        assert_eq!(&*Stamp::new(17), b"17:");
        assert_eq!(&*Stamp::new(0), b"0:");
        assert_eq!(*Stamp::new(u64::MAX), *format!("{}:", u64::MAX).as_bytes());
    }
}
