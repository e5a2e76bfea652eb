//! `warpsocket._core`: the Python binding of `warpsocket-core`. It converts
//! Python values to core types and back, and delegates: every rule and
//! default lives in the core or in `warpsocket.config`.
//!
//! Modules, each using only those listed before it: `errors` (core errors to
//! Python exceptions), `gil` (when to release the GIL), `convert` (Python
//! values to core types), `functions` (the module functions), `queue` (the
//! worker queue), `server` (the server object), `client` (the cluster client
//! object, docs/api.md#cluster-client); `logs` (the engine's log
//! records, queued for a Python thread) stands apart, `timings`
//! (handler-call histograms) and `names` (the shared names' tables) use only
//! the core, and `allocator` (the extension's global allocator) uses neither.

use std::sync::{Arc, LazyLock};

use pyo3::prelude::*;
use warpsocket_core::Engine;

mod allocator;
mod client;
mod convert;
mod errors;
mod functions;
mod gil;
mod logs;
mod names;
mod queue;
mod server;
mod timings;

#[global_allocator]
static ALLOCATOR: allocator::Allocator = allocator::Allocator;

/// The process-wide engine: sockets and counters outlive any one server.
static ENGINE: LazyLock<Arc<Engine>> = LazyLock::new(Engine::new);

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    logs::register(m)?;
    m.add_class::<server::Server>()?;
    m.add_class::<client::Cluster>()?;
    m.add_class::<timings::HandlerTimings>()?;
    queue::register(m)?;
    functions::register(m)?;
    names::register(m)?;
    Ok(())
}
