//! WarpSocket's engine: a multi-threaded WebSocket server whose events go to
//! worker queues and whose sockets any thread can send to.
//!
//! Nothing here knows about Python; `warpsocket-py` binds it.

mod channels;
pub mod cluster;
pub mod config;
mod connection;
pub mod deflate;
pub mod dispatch;
pub mod engine;
pub mod frame;
pub mod handshake;
mod keepalive;
pub mod kv;
mod registry;
pub mod server;
pub mod socket;
pub mod static_files;
pub mod stats;
mod wakeup;

pub use config::{Config, Handlers};
pub use dispatch::{Event, OpenRequest, Payload, WorkerQueue, Workers};
pub use engine::{Engine, Target, Verdict, VirtualError};
pub use frame::Kind;
pub use registry::MAX_PREFIX;
pub use server::Server;
