//! WarpSocket's engine: a multi-threaded WebSocket server whose events go to
//! worker queues and whose sockets any thread can send to.
//!
//! Nothing here knows about Python; `warpsocket-py` binds it.
//!
//! The modules form layers, listed below lowest first. A module uses only
//! the modules of the layers below its own and those listed before it in
//! its own layer, so the list reads as one order: every use goes down it.
//! `scripts/check_layers.py` checks that, and that every module is listed,
//! reading the list between the `layers` markers (each module's name in
//! backticks, nothing else in backticks there).
//!
//! <!-- layers -->
//! 1. the pieces the rest builds on: `clock`, `shards`, `ids`,
//!    `presence` (who is present in which channel), then `links` (a
//!    socket's channels, children and presence links), `kv`,
//!    `stats`, `wakeup`, `errors`, `keepalive`
//!    (per-connection state), `lifecycle` (the close lifecycle's state
//!    machine), `static_files`, `read_buffer`, `handshake`, `admission`
//!    (who may hold a handshake slot), then `limits` (connection caps and
//!    message rates, which a socket carries),
//!    `deflate`, `frame_bytes` (an encoded frame's shared bytes), then
//!    `frame`, then `history` (history channels' offsets
//!    and kept messages), then `config` (a server's settings, its history
//!    policies included);
//! 2. `verdict` (the upgrade's question and answer), `dispatch` (the worker
//!    queues), then `socket`, then `registry` and `channels`, then `frames`
//!    (one message's frames for many recipients);
//! 3. `hub`: this process's sockets and channels, and the operations on them;
//! 4. `cluster::wire`, `cluster::kept` (history channels in Redis),
//!    `cluster::conn` (the Redis side a node and a client share: the
//!    command connection, the batched publisher, the runtime),
//!    `cluster::relay` (history channels' in-order delivery on a node),
//!    `cluster::presence` (presence decided in Redis), `cluster::link`,
//!    `cluster::client` (a process that is no node, talking to a cluster),
//!    then `cluster`: the same operations across the nodes of a cluster;
//! 5. `engine`: the façade that routes each call to the hub or the cluster;
//! 6. the server side, which serves connections into the engine:
//!    `request_head`, `tls_stream` (the TLS record layer) and `tls`
//!    (before the WebSocket upgrade), `context`
//!    (what a server's tasks share), then `upgrade`, then `connection`
//!    (one connection's task),
//!    and `sweep` (keepalive); `server` on top.
//! <!-- /layers -->

mod admission;
mod channels;
mod clock;
pub mod cluster;
pub mod config;
mod connection;
mod context;
pub mod deflate;
pub mod dispatch;
pub mod engine;
pub mod errors;
pub mod frame;
mod frame_bytes;
mod frames;
pub mod handshake;
pub mod history;
mod hub;
mod ids;
mod keepalive;
pub mod kv;
mod lifecycle;
mod limits;
mod links;
pub mod presence;
mod read_buffer;
mod registry;
mod request_head;
pub mod server;
mod shards;
pub mod socket;
pub mod static_files;
pub mod stats;
mod sweep;
pub mod tls;
mod tls_stream;
mod upgrade;
mod verdict;
mod wakeup;

pub use config::{Config, Handlers};
pub use dispatch::Payload;
pub use engine::Engine;
pub use errors::{JoinError, PresenceError, Unreachable, VirtualError};
pub use frame::Kind;
pub use hub::Target;
pub use registry::MAX_PREFIX;
pub use server::Server;
pub use socket::{Event, WorkerQueue, Workers};
pub use verdict::{OpenRequest, Verdict};
pub use wakeup::Wakeup;
