//! The process's one monotonic clock, read by the worker queues (event read
//! times, the hang signal) and the keepalive sweep (when pings are due).
//!
//! One clock rather than one per user: times taken by one module and
//! compared by another (a connection's open time, checked by the sweep)
//! then always agree, and the sweep of a server started later reads the
//! same milliseconds as the connections it walks.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Time since the clock's start, the first read in the process.
pub(crate) fn elapsed() -> Duration {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

/// Milliseconds on the clock, never 0: callers store times in atomics, where
/// 0 stands for "never" or "not yet".
pub(crate) fn now_ms() -> u64 {
    elapsed().as_millis() as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_zero_and_never_backwards() {
        let first = now_ms();
        assert!(first >= 1);
        std::thread::sleep(Duration::from_millis(2));
        assert!(now_ms() >= first + 2);
    }
}
