//! Keepalive state: the three small atomics (last ping, heard, deaf) each
//! connection keeps so that one sweep task per server can ping it, and the
//! rule of when a ping is due or the connection has failed.
//!
//! A per-connection timer would cost every connection a timer entry in its
//! task for its whole life; the atomics cost 16 bytes. A leaf: uses nothing
//! of the crate.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One connection's keepalive state. Times are milliseconds on the process's
/// clock (`clock::now_ms`); 0 means the connection is not open yet.
#[derive(Default)]
pub(crate) struct Keepalive {
    /// When the last ping was sent, or when the connection opened.
    last_ping: AtomicU64,
    /// The peer sent something since the last ping (true before the first).
    heard: AtomicBool,
    /// Its reader was paused by flow control and has not drained the socket
    /// since: a pong may be waiting unread in the kernel, so silence proves
    /// nothing.
    deaf: AtomicBool,
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
    pub(crate) fn start(&self, now: u64) {
        self.heard.store(true, Ordering::Relaxed);
        self.last_ping.store(now, Ordering::Release);
    }

    /// The peer sent something.
    pub(crate) fn heard(&self) {
        // Read first: a busy connection does not write its cache line per read.
        if !self.heard.load(Ordering::Relaxed) {
            self.heard.store(true, Ordering::Relaxed);
        }
    }

    /// The reader stopped reading to let the handlers catch up.
    pub(crate) fn deaf(&self) {
        if !self.deaf.load(Ordering::Relaxed) {
            self.deaf.store(true, Ordering::Relaxed);
        }
    }

    /// The reader drained the socket: all the peer sent so far was heard.
    pub(crate) fn listening(&self) {
        if self.deaf.load(Ordering::Relaxed) {
            // Release: a check that sees it cleared also sees `heard` set by
            // the read that drained the socket.
            self.deaf.store(false, Ordering::Release);
        }
    }

    pub(crate) fn check(&self, now: u64, interval: u64, timeout: u64) -> Option<Action> {
        let deaf = self.deaf.load(Ordering::Acquire);
        let last = self.last_ping.load(Ordering::Acquire);
        if last == 0 {
            return None;
        }
        match due(
            now,
            last,
            self.heard.load(Ordering::Relaxed),
            interval,
            timeout,
        ) {
            Some(Action::Fail) if deaf => None,
            action => action,
        }
    }

    /// Called before the ping is queued, so that whatever the peer sends
    /// after it counts as heard.
    pub(crate) fn pinged(&self, now: u64) {
        self.heard.store(false, Ordering::Relaxed);
        self.last_ping.store(now, Ordering::Release);
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
    fn a_connection_is_swept_only_once_open() {
        let k = Keepalive::default();
        assert_eq!(k.check(10_000, 100, 100), None, "not open yet");
        k.start(50);
        assert_eq!(k.check(150, 100, 100), Some(Action::Ping));
        k.pinged(150);
        k.heard();
        assert_eq!(k.check(249, 100, 100), None);
        k.pinged(250);
        assert_eq!(k.check(350, 100, 100), Some(Action::Fail));
    }

    #[test]
    fn a_paused_reader_does_not_fail_until_it_drained_the_socket() {
        let k = Keepalive::default();
        k.start(50);
        k.pinged(150);
        k.deaf();
        assert_eq!(
            k.check(10_000, 100, 100),
            None,
            "paused: unheard, not silent"
        );
        k.listening();
        assert_eq!(k.check(10_000, 100, 100), Some(Action::Fail));
        k.deaf();
        k.heard();
        k.listening();
        assert_eq!(k.check(10_000, 100, 100), Some(Action::Ping));
    }
}
