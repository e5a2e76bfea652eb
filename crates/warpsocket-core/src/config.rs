//! Server settings, validated by the caller (the Python layer turns bad
//! options into TypeError/ValueError before they get here). The defaults are
//! for Rust callers; Python's are in `warpsocket.config`, which always passes
//! every setting the binding takes.

use std::path::PathBuf;
use std::time::Duration;

use crate::history::Policies;

/// Which handlers the worker module defines: the core answers for the missing
/// ones itself (accept without asking, close with 1003) instead of a round
/// trip through a worker.
#[derive(Clone, Copy, Debug, Default)]
pub struct Handlers {
    pub open: bool,
    pub text: bool,
    pub binary: bool,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Addresses to listen on, e.g. `127.0.0.1:3000` or `[::1]:3001`.
    pub bind: Vec<String>,
    pub handlers: Handlers,
    /// Incoming messages above this close the connection with 1009.
    pub max_message_size: usize,
    /// Queued outgoing bytes above this close the connection with 1008.
    pub max_backpressure: usize,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// How long an upgrade may wait for `handle_open`'s verdict before it is
    /// refused with 500 (the handler timeout plus slack).
    pub open_timeout: Duration,
    /// How long a client may take to send its upgrade request.
    pub handshake_timeout: Duration,
    /// I/O threads for the tokio runtime.
    pub io_threads: usize,
    /// Connections allowed in their handshake at once; more are dropped at
    /// accept, so a flood of idle or slow clients cannot exhaust the server.
    pub max_pending_upgrades: usize,
    /// Folder whose files answer plain HTTP GET/HEAD requests (else 426).
    pub static_dir: Option<PathBuf>,
    /// Negotiate permessage-deflate with clients that offer it (RFC 7692).
    pub compression: bool,
    /// `max_message_rate`: messages per second one connection may send (a
    /// burst of that many); faster, it is closed with 1008 "rate limit".
    pub max_message_rate: Option<f64>,
    /// `max_connections`: open connections beyond this are refused with 503.
    pub max_connections: Option<usize>,
    /// `max_connections_per_ip`: open connections from one address (an IPv6
    /// one by its /64) beyond this are refused with 429.
    pub max_connections_per_ip: Option<usize>,
    /// The channels that keep history (docs/api.md#history), set on the
    /// engine when the server binds and cleared when it shuts down.
    pub history: Policies,
}

/// The address a server binds when none is given (the CLI's `--bind`
/// default, via `_core.DEFAULT_BIND`).
pub const DEFAULT_BIND: &str = "127.0.0.1:3000";

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: vec![DEFAULT_BIND.into()],
            handlers: Handlers {
                open: false,
                text: true,
                binary: true,
            },
            max_message_size: 16 << 20,
            max_backpressure: 16 << 20,
            ping_interval: Duration::from_secs(20),
            ping_timeout: Duration::from_secs(20),
            open_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            io_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            static_dir: None,
            max_pending_upgrades: 1024,
            compression: false,
            max_message_rate: None,
            max_connections: None,
            max_connections_per_ip: None,
            history: Policies::default(),
        }
    }
}
