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
    /// Hung workers taken out of the rotation.
    pub worker_retirements: AtomicU64,
    /// Upgrade requests answered with something else than 101, by status.
    pub handshakes_refused: StatusCounts,
    /// Close frames this server queued (its own and its echoes of the
    /// peer's), by code; [`NO_CODE`] for a close frame without one.
    pub closes: CloseCounts,
    /// Cluster mode: messages handed to Redis for other nodes, requests and
    /// broadcasts received from them, and cross-node sends that failed
    /// (Redis unreachable or too slow).
    pub cluster_messages_out: AtomicU64,
    pub cluster_messages_in: AtomicU64,
    pub cluster_send_failures: AtomicU64,
}

/// The code `closes` counts a close frame without a code under (RFC 6455's
/// "no status code was present").
pub const NO_CODE: u16 = 1005;

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// One counter per code from `FIRST` to `FIRST + N - 1`: counting is one
/// relaxed atomic add, with no lock and no map, from any thread.
pub struct CodeCounts<const FIRST: u16, const N: usize>([AtomicU64; N]);

/// HTTP statuses 100..=599.
pub type StatusCounts = CodeCounts<100, 500>;
/// Close codes 1000..=4999: every code a close frame may carry.
pub type CloseCounts = CodeCounts<1000, 4000>;

impl<const FIRST: u16, const N: usize> Default for CodeCounts<FIRST, N> {
    fn default() -> Self {
        CodeCounts(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl<const FIRST: u16, const N: usize> CodeCounts<FIRST, N> {
    /// Counts one `code`; a code outside the range is not counted (callers
    /// only pass validated codes).
    pub(crate) fn count(&self, code: u16) {
        if let Some(slot) = self.0.get(usize::from(code.wrapping_sub(FIRST))) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The codes counted at least once, ascending, with their counts.
    pub fn snapshot(&self) -> Vec<(u16, u64)> {
        (FIRST..)
            .zip(&self.0)
            .filter_map(|(code, n)| match n.load(Ordering::Relaxed) {
                0 => None,
                n => Some((code, n)),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_counts_cover_their_range_and_skip_the_rest() {
        let counts = CloseCounts::default();
        for code in [1000, 1000, 1011, 4999, 999, 5000, 0, u16::MAX] {
            counts.count(code);
        }
        assert_eq!(counts.snapshot(), vec![(1000, 2), (1011, 1), (4999, 1)]);
        let statuses = StatusCounts::default();
        statuses.count(100);
        statuses.count(599);
        statuses.count(600);
        assert_eq!(statuses.snapshot(), vec![(100, 1), (599, 1)]);
    }
}
