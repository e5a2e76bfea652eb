//! Socket ids: how they are made, hashed, and which node they belong to.
//!
//! Owns the id sequence, the node bits in the top of every id, and the
//! hasher every id-keyed map uses. A leaf: it uses no other module of the
//! crate.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Node numbers live above this bit of a socket id; below it, the node's own
/// sequence. 13 bits of node keep every id below 2^53, exact in JSON numbers.
pub const NODE_SHIFT: u32 = 40;
/// The highest node number.
pub(crate) const MAX_NODE: u64 = (1 << 13) - 1;

/// The node that handed out `id` (0: a process not in a cluster).
pub fn owner(id: u64) -> u16 {
    (id >> NODE_SHIFT) as u16
}

/// The node number for the `n`th node to join: 1..=MAX_NODE, wrapping.
pub(crate) fn node_number(n: u64) -> u16 {
    ((n.saturating_sub(1) % MAX_NODE) + 1) as u16
}

/// Hands out ids: never reused within a process, and carrying the node
/// number while the process is a node of a cluster.
#[derive(Default)]
pub(crate) struct IdGenerator {
    last: AtomicU64,
    /// The node number in the top bits of every id handed out (0 alone).
    base: AtomicU64,
}

impl IdGenerator {
    pub(crate) fn next(&self) -> u64 {
        self.base.load(Ordering::Relaxed) | (self.last.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Ids handed out from now on carry `node` (0: a process on its own).
    pub(crate) fn set_node(&self, node: u16) {
        self.base
            .store(u64::from(node) << NODE_SHIFT, Ordering::Relaxed);
    }
}

/// Socket ids are already well spread: use them as their own hash.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // Multiply so the bits hashbrown takes from the top vary too.
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A map keyed by socket id.
pub(crate) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

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

    #[test]
    fn ids_carry_the_node_set_when_they_are_made() {
        let ids = IdGenerator::default();
        assert_eq!(ids.next(), 1);
        ids.set_node(3);
        assert_eq!((owner(ids.next()), ids.next() & 0xff), (3, 3));
        ids.set_node(0);
        assert_eq!(ids.next(), 4);
    }
}
