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

/// The code `closes` counts a close frame without a code under (RFC 6455's
/// "no status code was present").
pub const NO_CODE: u16 = 1005;

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes back an [`add`](Self::add) made ahead of the event it counts.
    pub(crate) fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
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

/// Handler kinds a [`Timings`] tells apart (open, text, binary, close).
pub const HANDLER_KINDS: usize = 4;

/// Two histograms by handler kind with the same bucket bounds: the queue
/// wait of handler calls and how long they ran. One worker thread records
/// into its own; a scrape reads them. Recording is a few relaxed atomic
/// operations: no lock, and no Python code per message.
pub struct Timings {
    /// Upper bounds of the buckets, ascending; a last bucket (+Inf) follows.
    bounds: Box<[f64]>,
    /// Per histogram (wait, ran), kind and bucket: observations, not cumulative.
    counts: Box<[AtomicU64]>,
    /// Per histogram and kind: the sum of the observations, as `f64` bits.
    sums: [AtomicU64; 2 * HANDLER_KINDS],
}

impl Timings {
    pub fn new(bounds: &[f64]) -> Self {
        let slots = 2 * HANDLER_KINDS * (bounds.len() + 1);
        Timings {
            bounds: bounds.into(),
            counts: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            sums: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Counts one handler call of `kind`; false (nothing counted) for an
    /// unknown kind. Only one thread may record into a `Timings`: the sums
    /// are read, added to and written back, which is exact with one writer.
    pub fn record(&self, kind: usize, waited: f64, ran: f64) -> bool {
        if kind >= HANDLER_KINDS {
            return false;
        }
        for (histogram, value) in [waited, ran].into_iter().enumerate() {
            // The first bucket whose bound is >= value, as Prometheus' `le`.
            let bucket = self.bounds.partition_point(|&bound| bound < value);
            let slot = (histogram * HANDLER_KINDS + kind) * (self.bounds.len() + 1) + bucket;
            self.counts[slot].fetch_add(1, Ordering::Relaxed);
            let sum = &self.sums[histogram * HANDLER_KINDS + kind];
            let total = f64::from_bits(sum.load(Ordering::Relaxed)) + value;
            sum.store(total.to_bits(), Ordering::Relaxed);
        }
        true
    }

    /// Per histogram (wait, ran) and kind: the bucket counts (the last is
    /// +Inf; not cumulative) and the sum.
    pub fn snapshot(&self) -> [Vec<(Vec<u64>, f64)>; 2] {
        let width = self.bounds.len() + 1;
        std::array::from_fn(|histogram| {
            (0..HANDLER_KINDS)
                .map(|kind| {
                    let start = (histogram * HANDLER_KINDS + kind) * width;
                    let counts = self.counts[start..start + width]
                        .iter()
                        .map(|n| n.load(Ordering::Relaxed))
                        .collect();
                    let sum = self.sums[histogram * HANDLER_KINDS + kind].load(Ordering::Relaxed);
                    (counts, f64::from_bits(sum))
                })
                .collect()
        })
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

    #[test]
    fn timings_bucket_like_prometheus_le() {
        let timings = Timings::new(&[0.001, 0.01]);
        assert!(timings.record(1, 0.001, 0.5));
        assert!(timings.record(1, 0.002, 0.01));
        assert!(!timings.record(HANDLER_KINDS, 0.0, 0.0));
        let [wait, ran] = timings.snapshot();
        assert_eq!(wait[1], (vec![1, 1, 0], 0.003));
        assert_eq!(ran[1], (vec![0, 1, 1], 0.51));
        assert_eq!(wait[0], (vec![0, 0, 0], 0.0));
    }
}
