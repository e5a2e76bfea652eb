//! WarpSocket's engine: a multi-threaded WebSocket server whose events go to
//! worker queues and whose sockets any thread can send to.
//!
//! Nothing here knows about Python; `warpsocket-py` binds it.
//!
//! The modules form layers, each using only those below it (checked by
//! `scripts/check_layers.py`):
//! 1. leaves: `frame`, `handshake`, `config`, `ids`, `links`, `kv`, `stats`,
//!    `wakeup`, `errors`, `keepalive` (per-connection state), `lifecycle`
//!    (the close lifecycle's state machine), `static_files`, `read_buffer`;
//! 2. `dispatch`, then `socket`, then `registry` and `channels`;
//! 3. `hub`: this process's sockets and channels, and the operations on them;
//! 4. `cluster`: the same operations across the nodes of a cluster;
//! 5. `engine`: the façade that routes each call to the hub or the cluster;
//! 6. the server side, which serves connections into the engine: `context`
//!    (what a server's tasks share), then `upgrade`, then `connection` (one
//!    connection's task), and `sweep` (keepalive); `server` on top.

mod channels;
pub mod cluster;
pub mod config;
mod connection;
mod context;
pub mod deflate;
pub mod dispatch;
pub mod engine;
pub mod errors;
pub mod frame;
pub mod handshake;
mod hub;
mod ids;
mod keepalive;
pub mod kv;
mod lifecycle;
mod links;
mod read_buffer;
mod registry;
pub mod server;
pub mod socket;
pub mod static_files;
pub mod stats;
mod sweep;
pub mod tls;
mod upgrade;
mod wakeup;

pub use config::{Config, Handlers};
pub use dispatch::{OpenRequest, Payload, Verdict};
pub use engine::Engine;
pub use errors::{JoinError, Unreachable, VirtualError};
pub use frame::Kind;
pub use hub::Target;
pub use registry::MAX_PREFIX;
pub use server::Server;
pub use socket::{Event, WorkerQueue, Workers};
pub use wakeup::Wakeup;
