//! A node's delivery of history channels (docs/api.md#history) in offset
//! order. Every message of such a channel, the node's own included, reaches
//! the local subscribers only when it comes back from Redis with its offset,
//! in the order Redis sequenced it; a [`Relay`] per channel remembers the
//! last offset delivered, so a duplicate is dropped and a gap (messages
//! published while the node's pub/sub connection was down) is noticed and
//! filled from Redis before the message after it.
//!
//! A recover puts its targets on hold: from the moment they are subscribed,
//! the live messages for them are kept aside instead of delivered; once the
//! recover has read the channel from Redis it queues the kept messages it
//! read, then those held that came after its read. The pub/sub stream may
//! lag behind the read: the messages the read covered that arrive after it
//! are then not delivered to the targets again. The relay's lock, held
//! for every delivery and for both ends of a hold, is what makes the
//! hand-over exact: each message reaches a recovering target once, in order.
//!
//! Lock order: a relay, then the hub's locks (as a history log in one
//! process).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;

use super::kept::Read;
use super::wire::Sequenced;
use crate::frame::Kind;
use crate::history::Policy;
use crate::hub::{Hub, Target};
use crate::shards::Shards;

#[derive(Default)]
pub(super) struct Relays {
    relays: Shards<Mutex<HashMap<Bytes, Relay>>>,
    next_hold: AtomicU64,
}

#[derive(Default)]
struct Relay {
    /// The epoch of the last message delivered (empty: none yet).
    epoch: Bytes,
    delivered: u64,
    holds: Vec<Hold>,
}

struct Hold {
    token: u64,
    ids: Vec<u64>,
    state: HoldState,
}

enum HoldState {
    /// The recover has not read the channel yet: live messages are kept
    /// aside.
    Holding(Vec<Held>),
    /// The recover queued what it read, up to `last` of `epoch`, but this
    /// node's pub/sub stream is behind its read: the messages up to there
    /// still to come are not for the targets again.
    Covered { epoch: Bytes, last: u64 },
}

struct Held {
    epoch: Bytes,
    offset: u64,
    kind: Kind,
    payload: Bytes,
}

/// What became of a message from Redis.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Arrival {
    Delivered,
    /// Delivered before (a gap's filling raced with it): dropped.
    Duplicate,
    /// Messages after `after` are missing before it: not delivered yet.
    Gap {
        after: u64,
    },
}

/// A recover's hold on its targets, from [`Relays::hold`].
pub(super) struct HoldToken(u64);

impl Relays {
    /// Delivers one message of `channel` to the local subscribers not on
    /// hold, and keeps it for the holds. With `fill_gaps`, a message that
    /// does not follow the last one delivered in the same epoch is not
    /// delivered: the caller fetches the missing ones first.
    pub(super) fn arrive(
        &self,
        hub: &Hub,
        channel: &[u8],
        policy: &Policy,
        message: &Sequenced<'_>,
        fill_gaps: bool,
    ) -> Arrival {
        let mut overflowed = Vec::new();
        let arrival = {
            let mut relays = self.relays.shard(channel).lock();
            let relay = match relays.get_mut(channel) {
                Some(relay) => relay,
                None => relays.entry(Bytes::copy_from_slice(channel)).or_default(),
            };
            let same_epoch = *relay.epoch == *message.epoch;
            if same_epoch && message.offset <= relay.delivered {
                return Arrival::Duplicate;
            }
            if fill_gaps && same_epoch && message.offset > relay.delivered + 1 {
                return Arrival::Gap {
                    after: relay.delivered,
                };
            }
            if !same_epoch {
                relay.epoch = Bytes::copy_from_slice(message.epoch);
            }
            relay.delivered = message.offset;
            let mut skip = Vec::new();
            let epoch = &relay.epoch;
            relay.holds.retain_mut(|hold| match &mut hold.state {
                HoldState::Holding(held) => {
                    skip.extend_from_slice(&hold.ids);
                    held.push(Held {
                        epoch: epoch.clone(),
                        offset: message.offset,
                        kind: message.kind,
                        payload: Bytes::copy_from_slice(message.payload),
                    });
                    true
                }
                HoldState::Covered {
                    epoch: covered,
                    last,
                } => {
                    let replayed = *covered == *epoch && message.offset <= *last;
                    if replayed {
                        skip.extend_from_slice(&hold.ids);
                    }
                    // Past what the read covered: the hold is over.
                    replayed
                }
            });
            hub.relay_kept(
                channel,
                &skip,
                policy.stamp.then_some(message.offset),
                message.kind,
                message.payload,
                &mut overflowed,
            );
            Arrival::Delivered
        };
        hub.report_overflows(overflowed);
        arrival
    }

    /// Subscribes `ids` to `channel` (delta 1) and holds the live messages
    /// for them until [`release`](Self::release).
    pub(super) fn hold(&self, hub: &Hub, channel: &Bytes, ids: &[u64]) -> HoldToken {
        let token = self.next_hold.fetch_add(1, Ordering::Relaxed);
        let mut distinct = ids.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let mut relays = self.relays.shard(channel).lock();
        let relay = relays.entry(channel.clone()).or_default();
        relay.holds.push(Hold {
            token,
            ids: distinct,
            state: HoldState::Holding(Vec::new()),
        });
        let targets: Vec<Target> = ids.iter().map(|&id| Target::Socket(id)).collect();
        hub.subscribe(&targets, channel, 1);
        HoldToken(token)
    }

    /// Ends a hold. With the recover's `read` of the channel, queues the
    /// kept messages after `since` when nothing was missed (returning
    /// whether so), then the held messages the read did not cover. Without
    /// (Redis did not answer), undoes the subscription and drops the held.
    pub(super) fn release(
        &self,
        hub: &Hub,
        channel: &Bytes,
        policy: &Policy,
        token: HoldToken,
        read: Option<&Read>,
        since: (&[u8], u64),
    ) -> bool {
        let mut overflowed = Vec::new();
        let recovered = {
            let mut relays = self.relays.shard(channel).lock();
            let Some(relay) = relays.get_mut(&channel[..]) else {
                return false;
            };
            let Some(at) = relay.holds.iter().position(|h| h.token == token.0) else {
                return false;
            };
            let Some(read) = read else {
                let hold = relay.holds.swap_remove(at);
                let targets: Vec<Target> = hold.ids.iter().map(|&id| Target::Socket(id)).collect();
                hub.subscribe(&targets, channel, -1);
                return false;
            };
            // A relay that has delivered nothing yet (the node just began
            // to listen) may be behind too.
            let behind = !(*relay.epoch == *read.epoch && relay.delivered >= read.last);
            let hold = &mut relay.holds[at];
            let held = match std::mem::replace(
                &mut hold.state,
                HoldState::Covered {
                    epoch: read.epoch.clone(),
                    last: read.last,
                },
            ) {
                HoldState::Holding(held) => held,
                HoldState::Covered { .. } => Vec::new(),
            };
            let stamp = |offset| policy.stamp.then_some(offset);
            let recovered = read.recoverable(since.0, since.1);
            if recovered {
                for (offset, kind, data) in &read.kept {
                    if *offset > since.1 {
                        hub.replay_kept(&hold.ids, stamp(*offset), *kind, data, &mut overflowed);
                    }
                }
            }
            let mut past = false;
            for held in &held {
                if held.epoch != read.epoch || held.offset > read.last {
                    past = true;
                    hub.replay_kept(
                        &hold.ids,
                        stamp(held.offset),
                        held.kind,
                        &held.payload,
                        &mut overflowed,
                    );
                }
            }
            // Unless messages the read covered are still to come here.
            if past || !behind {
                relay.holds.swap_remove(at);
            }
            if relay.holds.is_empty() && !hub.has_channel(channel) {
                relays.remove(&channel[..]);
            }
            recovered
        };
        hub.report_overflows(overflowed);
        recovered
    }

    /// The node no longer listens on `channel`: its relay goes, unless a
    /// recover holds it.
    pub(super) fn forget(&self, channel: &[u8]) {
        let mut relays = self.relays.shard(channel).lock();
        if relays.get(channel).is_some_and(|r| r.holds.is_empty()) {
            relays.remove(channel);
        }
    }
}
