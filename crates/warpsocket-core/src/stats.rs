//! Process-wide counters behind `stats()`.
//!
//! A leaf: it uses no other module of the crate.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Counters {
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub backpressure_closes: AtomicU64,
    /// Outgoing messages deflated (permessage-deflate): one per distinct
    /// frame, however many recipients get it.
    pub messages_compressed: AtomicU64,
    /// Cluster mode: messages handed to Redis for other nodes, requests and
    /// broadcasts received from them, and cross-node sends that failed
    /// (Redis unreachable or too slow).
    pub cluster_messages_out: AtomicU64,
    pub cluster_messages_in: AtomicU64,
    pub cluster_send_failures: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
