//! Process-wide counters behind `stats()`.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Counters {
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub backpressure_closes: AtomicU64,
    /// Connections closed with 1008 for `max_message_rate`.
    pub rate_limit_closes: AtomicU64,
    /// Upgrades refused for `max_connections` (503) or
    /// `max_connections_per_ip` (429).
    pub connections_refused: AtomicU64,
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

/// The event a worker runs a handler for. Its number is the event kind in
/// the worker queue's events and the kind a [`Timings`] records under, and
/// `warpsocket.HandlerKind` is made from [`HandlerKind::ALL`]: the worker,
/// the histograms and their `handler` label agree because they share this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum HandlerKind {
    Open = 0,
    Text = 1,
    Binary = 2,
    Close = 3,
    Presence = 4,
}

impl HandlerKind {
    /// Every kind, in the order of its number.
    pub const ALL: [HandlerKind; 5] = [
        Self::Open,
        Self::Text,
        Self::Binary,
        Self::Close,
        Self::Presence,
    ];

    /// The name the Python layer gives the kind (its lower case is the
    /// metrics' `handler` label).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Open => "OPEN",
            Self::Text => "TEXT",
            Self::Binary => "BINARY",
            Self::Close => "CLOSE",
            Self::Presence => "PRESENCE",
        }
    }
}

/// Handler kinds a [`Timings`] tells apart.
pub const HANDLER_KINDS: usize = HandlerKind::ALL.len();

/// How `warpsocket.metrics` exposes a key of `stats()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// A value that goes up and down: `warpsocket_<key>`.
    Gauge,
    /// A count that only grows: `warpsocket_<key>_total`.
    Counter,
    /// Counts by code (a dict in `stats()`): `warpsocket_<key>_total{<label>}`.
    Labelled(&'static str),
}

impl Metric {
    /// The Prometheus type.
    pub const fn kind(self) -> &'static str {
        match self {
            Self::Gauge => "gauge",
            Self::Counter | Self::Labelled(_) => "counter",
        }
    }

    /// The label of a labelled counter.
    pub const fn label(self) -> Option<&'static str> {
        match self {
            Self::Labelled(label) => Some(label),
            Self::Gauge | Self::Counter => None,
        }
    }
}

/// A value the engine computes when asked, rather than one of [`Counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    Connections,
    VirtualSockets,
    Channels,
    Subscriptions,
    /// In a cluster, asked from Redis (-1 while it cannot be asked).
    Keys,
    NodeId,
    /// Only in a cluster: absent from `stats()` outside one.
    RedisConnected,
    /// Channels whose history this process keeps, and the messages kept.
    HistoryChannels,
    HistoryMessages,
    /// (channel, member) pairs present through this process's sockets.
    PresenceMembers,
}

/// Where a key of `stats()` takes its value from.
#[derive(Clone, Copy)]
pub enum Source {
    Live(Live),
    Counter(fn(&Counters) -> &AtomicU64),
    /// Counts by code, as [`CodeCounts::snapshot`] gives them.
    Codes(fn(&Counters) -> Vec<(u16, u64)>),
}

/// One key of `stats()` (all but `workers`, which the Python layer adds).
#[derive(Clone, Copy)]
pub struct Field {
    pub name: &'static str,
    pub metric: Metric,
    /// The metric's help text.
    pub help: &'static str,
    pub source: Source,
}

const fn live(name: &'static str, help: &'static str, live: Live) -> Field {
    Field {
        name,
        metric: Metric::Gauge,
        help,
        source: Source::Live(live),
    }
}

const fn counter(
    name: &'static str,
    help: &'static str,
    counter: fn(&Counters) -> &AtomicU64,
) -> Field {
    Field {
        name,
        metric: Metric::Counter,
        help,
        source: Source::Counter(counter),
    }
}

const fn by_code(
    name: &'static str,
    label: &'static str,
    help: &'static str,
    codes: fn(&Counters) -> Vec<(u16, u64)>,
) -> Field {
    Field {
        name,
        metric: Metric::Labelled(label),
        help,
        source: Source::Codes(codes),
    }
}

/// The keys of `stats()`, in the order it lists them. The binding builds
/// `counters()` from this table and exports it (`_core.STATS_FIELDS`), from
/// which `warpsocket.metrics` names, types and describes each metric; a test
/// holds the `Stats` TypedDict, `stats()`'s docstring and the README to it.
pub const FIELDS: &[Field] = &[
    live(
        "connections",
        "Open WebSocket connections.",
        Live::Connections,
    ),
    live(
        "virtual_sockets",
        "Live virtual sockets.",
        Live::VirtualSockets,
    ),
    live(
        "channels",
        "Channels with at least one subscription.",
        Live::Channels,
    ),
    live(
        "subscriptions",
        "Socket/channel subscription pairs.",
        Live::Subscriptions,
    ),
    live(
        "keys",
        "Keys in the key/value store (absent while Redis cannot be asked).",
        Live::Keys,
    ),
    live(
        "history_channels",
        "Channels whose history this process keeps.",
        Live::HistoryChannels,
    ),
    live(
        "history_messages",
        "Messages kept in history, over every channel.",
        Live::HistoryMessages,
    ),
    live(
        "presence_members",
        "(Channel, member) pairs present through this process's sockets.",
        Live::PresenceMembers,
    ),
    counter("messages_in", "Messages received from clients.", |c| {
        &c.messages_in
    }),
    counter("messages_out", "Frames queued to clients.", |c| {
        &c.messages_out
    }),
    counter("bytes_in", "Payload bytes received from clients.", |c| {
        &c.bytes_in
    }),
    counter("bytes_out", "Payload bytes queued to clients.", |c| {
        &c.bytes_out
    }),
    counter(
        "backpressure_closes",
        "Connections closed with 1008 for exceeding max_backpressure.",
        |c| &c.backpressure_closes,
    ),
    counter(
        "rate_limit_closes",
        "Connections closed with 1008 for exceeding max_message_rate.",
        |c| &c.rate_limit_closes,
    ),
    counter(
        "connections_refused",
        "Upgrades refused for max_connections (503) or max_connections_per_ip (429).",
        |c| &c.connections_refused,
    ),
    counter(
        "messages_compressed",
        "Outgoing messages deflated (once per broadcast, not per recipient).",
        |c| &c.messages_compressed,
    ),
    live(
        "node_id",
        "This node's cluster id (0 outside a cluster).",
        Live::NodeId,
    ),
    counter(
        "cluster_messages_out",
        "Messages handed to Redis for other cluster nodes.",
        |c| &c.cluster_messages_out,
    ),
    counter(
        "cluster_messages_in",
        "Messages received from other cluster nodes through Redis.",
        |c| &c.cluster_messages_in,
    ),
    counter(
        "cluster_send_failures",
        "Cross-node sends lost because Redis was unreachable.",
        |c| &c.cluster_send_failures,
    ),
    live(
        "redis_connected",
        "1 while the cluster's Redis connection is up, else 0.",
        Live::RedisConnected,
    ),
    counter(
        "worker_retirements",
        "Hung workers retired and replaced.",
        |c| &c.worker_retirements,
    ),
    by_code(
        "handshakes_refused",
        "status",
        "Upgrade requests answered with a status other than 101.",
        |c| c.handshakes_refused.snapshot(),
    ),
    by_code(
        "closes",
        "code",
        "Close frames the server sent, by close code.",
        |c| c.closes.snapshot(),
    ),
];

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
    fn handler_kinds_are_numbered_in_order_and_fields_named_once() {
        for (number, kind) in HandlerKind::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, number, "{}", kind.name());
        }
        let mut names: Vec<_> = FIELDS.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FIELDS.len(), "a stats() key is listed twice");
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
