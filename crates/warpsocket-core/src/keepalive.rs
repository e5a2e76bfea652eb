//! Keepalive pings for every connection of a server, driven by one sweep.
//!
//! A per-connection timer would cost every connection a timer entry in its
//! task for its whole life. Instead each connection keeps three small atomics
//! here, and one task per server wakes every [`tick`] and walks the
//! connections: it queues a ping to those due for one and fails with 1011
//! those silent for `ping_timeout` after their ping. A ping or a timeout
//! therefore fires up to one tick late (never early).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use crate::frame::{self, close_code};
use crate::server::Shared;
use crate::socket::Socket;

/// Shortest and longest sweep period.
const MIN_TICK: Duration = Duration::from_millis(10);
const MAX_TICK: Duration = Duration::from_secs(1);

/// How often the sweep runs: an eighth of the shorter of the two settings,
/// between 10 ms and 1 s (1 s with the defaults of 20 s).
pub(crate) fn tick(interval: Duration, timeout: Duration) -> Duration {
    (interval.min(timeout) / 8).clamp(MIN_TICK, MAX_TICK)
}

/// One connection's keepalive state. Times are milliseconds on the server's
/// clock ([`Clock`]); 0 means the connection is not open yet.
#[derive(Default)]
pub(crate) struct Keepalive {
    /// When the last ping was sent, or when the connection opened.
    last_ping: AtomicU64,
    /// The server whose sweep looks after this connection.
    server: AtomicU32,
    /// The peer sent something since the last ping (true before the first).
    heard: AtomicBool,
}

/// What the sweep does to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Ping,
    /// Nothing was heard within `timeout` of the last ping: close with 1011.
    Fail,
}

/// The keepalive rule: a ping every `interval`; while one is unanswered no
/// new one is sent, and the connection fails once it is `timeout` old.
/// `last` is when the last ping was sent (or the connection opened), `heard`
/// whether the peer sent anything since.
pub(crate) fn due(now: u64, last: u64, heard: bool, interval: u64, timeout: u64) -> Option<Action> {
    if !heard {
        return (now >= last.saturating_add(timeout)).then_some(Action::Fail);
    }
    (now >= last.saturating_add(interval)).then_some(Action::Ping)
}

impl Keepalive {
    /// The connection is open: its first ping is due `interval` from `now`.
    pub(crate) fn start(&self, server: u32, now: u64) {
        self.heard.store(true, Ordering::Relaxed);
        self.server.store(server, Ordering::Relaxed);
        self.last_ping.store(now, Ordering::Release);
    }

    /// The peer sent something.
    pub(crate) fn heard(&self) {
        // Read first: a busy connection does not write its cache line per read.
        if !self.heard.load(Ordering::Relaxed) {
            self.heard.store(true, Ordering::Relaxed);
        }
    }

    fn check(&self, server: u32, now: u64, interval: u64, timeout: u64) -> Option<Action> {
        let last = self.last_ping.load(Ordering::Acquire);
        if last == 0 || self.server.load(Ordering::Relaxed) != server {
            return None;
        }
        due(
            now,
            last,
            self.heard.load(Ordering::Relaxed),
            interval,
            timeout,
        )
    }

    /// Called before the ping is queued, so that whatever the peer sends
    /// after it counts as heard.
    fn pinged(&self, now: u64) {
        self.heard.store(false, Ordering::Relaxed);
        self.last_ping.store(now, Ordering::Release);
    }
}

/// Milliseconds since the server started, never 0.
pub(crate) struct Clock(Instant);

impl Clock {
    pub(crate) fn new() -> Self {
        Clock(Instant::now())
    }

    pub(crate) fn now(&self) -> u64 {
        self.0.elapsed().as_millis() as u64 + 1
    }
}

/// Runs the keepalive of every connection of the server until it stops.
pub(crate) async fn sweep(shared: Arc<Shared>) {
    let config = &shared.config;
    let (interval, timeout) = (config.ping_interval, config.ping_timeout);
    let mut ticker = tokio::time::interval(tick(interval, timeout));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let interval = interval.as_millis() as u64;
    let timeout = timeout.as_millis() as u64;
    let mut due: Vec<(Arc<Socket>, Action)> = Vec::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shared.stopping() => return,
        }
        let now = shared.clock.now();
        shared.engine.for_each_connection(|socket| {
            if let Some(action) = socket.keepalive.check(shared.id, now, interval, timeout) {
                due.push((socket.clone(), action));
            }
        });
        if due.is_empty() {
            continue;
        }
        // Acted on outside the registry's locks.
        let ping = frame::encode_ping(b"");
        for (socket, action) in due.drain(..) {
            match action {
                Action::Ping => {
                    socket.keepalive.pinged(now);
                    socket.send(&ping);
                }
                Action::Fail => {
                    socket.fail(close_code::INTERNAL, "keepalive ping timeout");
                }
            }
        }
        // Pings fall due together: keep the list's buffer only while small.
        if due.capacity() > 1024 {
            due = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_every_interval_and_fails_after_timeout() {
        // interval 1000, timeout 500, opened at 1
        assert_eq!(due(1000, 1, true, 1000, 500), None);
        assert_eq!(due(1001, 1, true, 1000, 500), Some(Action::Ping));
        // pinged at 1001: nothing heard yet
        assert_eq!(due(1400, 1001, false, 1000, 500), None);
        assert_eq!(due(1501, 1001, false, 1000, 500), Some(Action::Fail));
        // heard: the next ping comes an interval after the last one
        assert_eq!(due(1501, 1001, true, 1000, 500), None);
        assert_eq!(due(2001, 1001, true, 1000, 500), Some(Action::Ping));
        // interval < timeout: no second ping while one is unanswered
        assert_eq!(due(1600, 1001, false, 500, 1000), None);
        assert_eq!(due(2001, 1001, false, 500, 1000), Some(Action::Fail));
        // huge settings do not overflow
        assert_eq!(due(5, 1, true, u64::MAX, u64::MAX), None);
    }

    #[test]
    fn tick_is_an_eighth_of_the_shorter_setting_within_bounds() {
        let s = Duration::from_secs;
        assert_eq!(tick(s(20), s(20)), s(1));
        assert_eq!(
            tick(s(1), Duration::from_millis(400)),
            Duration::from_millis(50)
        );
        assert_eq!(tick(Duration::ZERO, s(1)), MIN_TICK);
    }

    #[test]
    fn a_connection_is_swept_only_once_open_and_by_its_server() {
        let k = Keepalive::default();
        assert_eq!(k.check(1, 10_000, 100, 100), None, "not open yet");
        k.start(1, 50);
        assert_eq!(k.check(2, 10_000, 100, 100), None, "another server's");
        assert_eq!(k.check(1, 150, 100, 100), Some(Action::Ping));
        k.pinged(150);
        k.heard();
        assert_eq!(k.check(1, 249, 100, 100), None);
        k.pinged(250);
        assert_eq!(k.check(1, 350, 100, 100), Some(Action::Fail));
    }
}
