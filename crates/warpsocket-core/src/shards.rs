//! The sharding of the process-wide maps (socket ids, channels, the
//! key/value store): how many shards each has and which one a key falls in,
//! defined once so the three maps cannot drift apart.
//!
//! Sharded so that unrelated keys rarely share a lock: a send locks one
//! shard of the sockets, a broadcast one shard of the channels.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

/// Shards per map: enough that threads working on different keys rarely
/// meet, few enough that a walk over every shard stays cheap.
pub(crate) const SHARDS: usize = 64;

pub(crate) struct Shards<T> {
    /// Random hashing: channel names and keys may come from clients.
    hasher: RandomState,
    shards: Box<[T]>,
}

impl<T: Default> Default for Shards<T> {
    fn default() -> Self {
        Shards {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| T::default()).collect(),
        }
    }
}

impl<T> Shards<T> {
    /// The shard of a byte-string key (a channel name, a kv key).
    pub(crate) fn shard(&self, key: &[u8]) -> &T {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// The shard of a socket id: ids are handed out in sequence, so their
    /// low bits alone spread consecutive sockets over the shards.
    pub(crate) fn shard_of_id(&self, id: u64) -> &T {
        &self.shards[id as usize % SHARDS]
    }

    /// Every shard, for the walks over a whole map.
    pub(crate) fn iter(&self) -> std::slice::Iter<'_, T> {
        self.shards.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_always_falls_in_the_same_shard_and_ids_spread_in_turn() {
        let shards: Shards<u8> = Shards::default();
        assert_eq!(shards.iter().len(), SHARDS);
        assert!(std::ptr::eq(shards.shard(b"room"), shards.shard(b"room")));
        let first = shards.shard_of_id(1) as *const u8;
        let next = shards.shard_of_id(2) as *const u8;
        assert_ne!(first, next);
        assert!(std::ptr::eq(
            shards.shard_of_id(1),
            shards.shard_of_id(1 + SHARDS as u64)
        ));
    }
}
