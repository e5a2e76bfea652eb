//! Abuse limits (docs/api.md, "Fairness and abuse limits"): how fast one
//! connection may send messages, and how many connections the server and
//! one source address may hold.
//!
//! Both are checked on the I/O threads, before anything reaches a worker:
//! a flood of messages or of connections costs the server no handler run.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::admission::source_of;
use crate::handshake::status;

/// `max_message_rate`: a token bucket per connection, kept as one number
/// (the generic cell rate algorithm): when the connection's bucket will be
/// full again if it sends nothing more. A message moves that moment one
/// interval later, and is refused when it would then lie more than the
/// burst ahead. No timer and no refill: one clock read and one compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Nanoseconds one message costs (1 s / rate).
    interval_ns: u64,
    /// How far ahead of now the bucket may be drained: `rate` messages'
    /// worth (at least one message, for a rate under 1 per second).
    burst_ns: u64,
}

impl RateLimit {
    /// A limit of `per_second` messages (finite and above 0: the Python
    /// layer checks), with a burst of that many.
    pub fn new(per_second: f64) -> Self {
        let interval = (1e9 / per_second).clamp(1.0, u64::MAX as f64 / 4.0);
        let burst = (per_second.max(1.0) * interval).min(u64::MAX as f64 / 4.0);
        RateLimit {
            interval_ns: interval.round() as u64,
            burst_ns: burst.round() as u64,
        }
    }

    /// Whether a connection whose bucket is `due` may send a message at
    /// `now_ns`; counts the message if so. `due` is the connection's own,
    /// touched by its task only (relaxed is enough).
    pub(crate) fn allow(&self, due: &AtomicU64, now_ns: u64) -> bool {
        let next = due
            .load(Ordering::Relaxed)
            .max(now_ns)
            .saturating_add(self.interval_ns);
        if next - now_ns > self.burst_ns {
            return false;
        }
        due.store(next, Ordering::Relaxed);
        true
    }
}

/// `max_connections` and `max_connections_per_ip`: the open connections
/// (from the read of their upgrade request to their end), counted in total
/// and by source (an IPv6 address by its /64, as admission counts them).
/// One lock, taken once when a connection opens and once when it ends,
/// never per message.
pub(crate) struct ConnectionLimits {
    max_total: Option<usize>,
    max_per_source: Option<usize>,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// A connection's place under the limits, given back with
/// [`ConnectionLimits::release`] when it ends.
#[derive(Debug)]
pub(crate) struct Slot {
    source: IpAddr,
}

impl ConnectionLimits {
    pub(crate) fn new(max_total: Option<usize>, max_per_source: Option<usize>) -> Self {
        ConnectionLimits {
            max_total,
            max_per_source,
            open: Mutex::default(),
        }
    }

    /// Whether any limit is set: without one, nothing is counted.
    pub(crate) fn active(&self) -> bool {
        self.max_total.is_some() || self.max_per_source.is_some()
    }

    /// Takes a place for a connection from `peer`, or says which status
    /// refuses it: 503 when the server holds `max_connections`, 429 when
    /// its source holds `max_connections_per_ip`.
    pub(crate) fn take(&self, peer: IpAddr) -> Result<Slot, u16> {
        let source = source_of(peer);
        let mut open = self.open.lock();
        if self.max_total.is_some_and(|max| open.total >= max) {
            return Err(status::UNAVAILABLE);
        }
        let held = open.by_source.get(&source).copied().unwrap_or(0);
        if self.max_per_source.is_some_and(|max| held >= max) {
            return Err(status::TOO_MANY_REQUESTS);
        }
        open.total += 1;
        if self.max_per_source.is_some() {
            *open.by_source.entry(source).or_default() += 1;
        }
        Ok(Slot { source })
    }

    /// Gives back the place of a connection that ended.
    pub(crate) fn release(&self, slot: Slot) {
        let mut open = self.open.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(held) = open.by_source.get_mut(&slot.source) {
            *held -= 1;
            if *held == 0 {
                open.by_source.remove(&slot.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_rate_messages_passes_then_one_per_interval() {
        let limit = RateLimit::new(100.0);
        let due = AtomicU64::new(0);
        let start = 5_000_000_000;
        assert!((0..100).all(|_| limit.allow(&due, start)));
        assert!(!limit.allow(&due, start));
        // A refused message costs nothing: 10 ms later exactly one more passes.
        assert!(limit.allow(&due, start + 10_000_000));
        assert!(!limit.allow(&due, start + 10_000_000));
        // After a quiet second the whole burst is back, no more.
        let later = start + 2_000_000_000;
        assert!((0..100).all(|_| limit.allow(&due, later)));
        assert!(!limit.allow(&due, later));
    }

    #[test]
    fn a_rate_under_one_still_lets_one_message_through() {
        let limit = RateLimit::new(0.5);
        let due = AtomicU64::new(0);
        assert!(limit.allow(&due, 1));
        assert!(!limit.allow(&due, 1_000_000_000));
        assert!(limit.allow(&due, 2_000_000_001));
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_total_and_each_source_are_capped_and_freed() {
        let limits = ConnectionLimits::new(Some(3), Some(2));
        let a = limits.take(ip("10.0.0.1")).unwrap();
        let _b = limits.take(ip("10.0.0.1")).unwrap();
        assert_eq!(limits.take(ip("10.0.0.1")).unwrap_err(), 429);
        let _c = limits.take(ip("10.0.0.2")).unwrap();
        assert_eq!(limits.take(ip("10.0.0.3")).unwrap_err(), 503);
        limits.release(a);
        let _d = limits.take(ip("10.0.0.1")).unwrap();
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        let limits = ConnectionLimits::new(None, Some(1));
        let _a = limits.take(ip("2001:db8:0:1::1")).unwrap();
        assert_eq!(limits.take(ip("2001:db8:0:1::ffff")).unwrap_err(), 429);
        let _b = limits.take(ip("2001:db8:0:2::1")).unwrap();
        let _c = limits.take(ip("10.0.0.1")).unwrap();
        assert_eq!(limits.take(ip("::ffff:10.0.0.1")).unwrap_err(), 429);
    }
}
