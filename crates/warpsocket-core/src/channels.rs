//! Channels: for each name, the socket ids subscribed and their reference
//! counts. Sharded by name so unrelated channels never share a lock.
//!
//! Knows ids only as numbers.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use parking_lot::{RwLock, RwLockReadGuard};

use crate::ids::IdMap;
use crate::shards::Shards;

/// What a count change did to a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// The count went from 0 to positive. Carries the channel's name as
    /// stored here, for the subscriber to keep without a copy of its own;
    /// `first` when the channel had no subscription before.
    Added { name: Bytes, first: bool },
    /// The count reached 0: the subscription is gone; `last` when it was
    /// the channel's last.
    Removed { last: bool },
    /// The count changed but the subscription stayed (or stayed absent).
    Kept,
}

type Subscribers = IdMap<u64>;

pub(crate) struct Channels {
    shards: Shards<RwLock<HashMap<Bytes, Subscribers>>>,
    /// Socket/channel pairs with a positive count.
    pairs: AtomicUsize,
    /// Channels with at least one subscription.
    live: AtomicUsize,
}

impl Default for Channels {
    fn default() -> Self {
        Channels {
            shards: Shards::default(),
            pairs: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
        }
    }
}

impl Channels {
    /// Adds `delta` to `id`'s count on `name`, never going below 0.
    pub(crate) fn update(&self, name: &Bytes, id: u64, delta: i64) -> Change {
        let mut shard = self.shards.shard(name).write();
        if delta > 0 {
            let (stored, subscribers, first) = match shard.entry(name.clone()) {
                Entry::Occupied(entry) => (entry.key().clone(), entry.into_mut(), false),
                Entry::Vacant(entry) => {
                    self.live.fetch_add(1, Ordering::Relaxed);
                    let key = entry.key().clone();
                    (key, entry.insert(Subscribers::default()), true)
                }
            };
            let count = subscribers.entry(id).or_insert(0);
            let added = *count == 0;
            *count = count.saturating_add(delta as u64);
            if added {
                self.pairs.fetch_add(1, Ordering::Relaxed);
                return Change::Added {
                    name: stored,
                    first,
                };
            }
            return Change::Kept;
        }
        let Some(subscribers) = shard.get_mut(name.as_ref()) else {
            return Change::Kept;
        };
        let Some(count) = subscribers.get_mut(&id) else {
            return Change::Kept;
        };
        if *count > delta.unsigned_abs() {
            *count -= delta.unsigned_abs();
            return Change::Kept;
        }
        subscribers.remove(&id);
        self.pairs.fetch_sub(1, Ordering::Relaxed);
        let last = subscribers.is_empty();
        if last {
            shard.remove(name.as_ref());
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
        Change::Removed { last }
    }

    /// The ids subscribed to `name`, read under the channel's shard lock.
    pub(crate) fn subscribers<'a>(&'a self, name: &'a [u8]) -> ChannelView<'a> {
        ChannelView {
            shard: self.shards.shard(name).read(),
            name,
        }
    }

    pub(crate) fn contains(&self, name: &[u8]) -> bool {
        self.shards.shard(name).read().contains_key(name)
    }

    /// Every channel with at least one subscription.
    pub(crate) fn names(&self) -> Vec<Bytes> {
        let mut names = Vec::new();
        for shard in self.shards.iter() {
            names.extend(shard.read().keys().cloned());
        }
        names
    }

    pub(crate) fn pair_count(&self) -> usize {
        self.pairs.load(Ordering::Relaxed)
    }

    pub(crate) fn channel_count(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

/// Read access to one channel's subscribers; blocks changes to its shard.
pub(crate) struct ChannelView<'a> {
    shard: RwLockReadGuard<'a, HashMap<Bytes, Subscribers>>,
    /// Borrowed from the caller: a send looks the name up without copying it.
    name: &'a [u8],
}

impl ChannelView<'_> {
    pub(crate) fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.shard
            .get(self.name)
            .into_iter()
            .flat_map(|s| s.keys().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_reference_counted() {
        let ch = Channels::default();
        let name = Bytes::from_static(b"room");
        let added = Change::Added {
            name: name.clone(),
            first: true,
        };
        assert_eq!(ch.update(&name, 1, 1), added);
        assert_eq!(ch.update(&name, 1, 2), Change::Kept);
        let copy = Bytes::copy_from_slice(b"room");
        let Change::Added {
            name: stored,
            first: false,
        } = ch.update(&copy, 2, 1)
        else {
            panic!("not added");
        };
        assert_eq!(stored.as_ptr(), name.as_ptr(), "the stored name is shared");
        assert_eq!((ch.channel_count(), ch.pair_count()), (1, 2));
        assert_eq!(ch.update(&name, 1, -2), Change::Kept);
        assert_eq!(ch.update(&name, 1, -5), Change::Removed { last: false });
        assert_eq!(ch.update(&name, 1, -1), Change::Kept);
        assert_eq!(ch.subscribers(b"room").ids().collect::<Vec<_>>(), vec![2]);
        assert_eq!(ch.update(&name, 2, -1), Change::Removed { last: true });
        assert_eq!((ch.channel_count(), ch.pair_count()), (0, 0));
        assert_eq!(ch.subscribers(b"room").ids().count(), 0);
    }
}
