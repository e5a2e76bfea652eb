//! The keepalive sweep: one task per server that wakes every [`tick`] and
//! walks the server's connections, queueing a ping to those due for one and
//! failing with 1011 those silent for `ping_timeout` after their ping. A ping
//! or a timeout therefore fires up to one tick late (never early). It also
//! returns the memory of expired history (`history`'s sweep).
//!
//! It walks every connection of the engine: one server runs per process
//! (`warpsocket.start()` refuses a second while one runs, and a stopped
//! server's connections are gone from the engine once its shutdown returns),
//! so those are the server's own.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use crate::clock;
use crate::context::Shared;
use crate::frame::{self, close_code};
use crate::keepalive::Action;
use crate::socket::Socket;

/// Shortest and longest sweep period.
const MIN_TICK: Duration = Duration::from_millis(10);
const MAX_TICK: Duration = Duration::from_secs(1);

/// How often the sweep runs: an eighth of the shorter of the two settings,
/// between 10 ms and 1 s (1 s with the defaults of 20 s).
fn tick(interval: Duration, timeout: Duration) -> Duration {
    (interval.min(timeout) / 8).clamp(MIN_TICK, MAX_TICK)
}

/// Runs the keepalive of every connection of the server until it stops.
pub(crate) async fn run(shared: Arc<Shared>) {
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
        let now = clock::now_ms();
        // The expired history's memory goes back too (once a second at most).
        shared.engine.sweep_history();
        shared.engine.for_each_connection(|socket| {
            if let Some(action) = socket.keepalive.check(now, interval, timeout) {
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
                    if socket.fail(close_code::INTERNAL, "keepalive ping timeout") {
                        shared.engine.stats().closes.count(close_code::INTERNAL);
                    }
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
    fn tick_is_an_eighth_of_the_shorter_setting_within_bounds() {
        let s = Duration::from_secs;
        assert_eq!(tick(s(20), s(20)), s(1));
        assert_eq!(
            tick(s(1), Duration::from_millis(400)),
            Duration::from_millis(50)
        );
        assert_eq!(tick(Duration::ZERO, s(1)), MIN_TICK);
    }
}
