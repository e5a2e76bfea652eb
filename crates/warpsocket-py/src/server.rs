//! The server object: binds, starts and stops a core server, and hands out
//! its worker queues.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use warpsocket_core::tls::Tls;
use warpsocket_core::{Config, Handlers};

use crate::convert::{self, HistoryRule};
use crate::errors;
use crate::gil::{self, Work};
use crate::queue::WorkerQueue;
use crate::ENGINE;

/// A bound (and, after `serve()`, accepting) server.
#[pyclass(frozen, module = "warpsocket._core")]
pub(crate) struct Server {
    inner: Mutex<warpsocket_core::Server>,
}

impl Server {
    fn lock(&self) -> PyResult<MutexGuard<'_, warpsocket_core::Server>> {
        self.inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("server state poisoned"))
    }
}

#[pymethods]
impl Server {
    #[new]
    #[pyo3(signature = (bind, *, max_message_size, max_backpressure, ping_interval, ping_timeout, open_timeout, max_pending_upgrades, compression, max_message_rate=None, max_connections=None, max_connections_per_ip=None, io_threads=None, static_dir=None, tls_cert=None, tls_key=None, history=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        bind: Vec<String>,
        max_message_size: usize,
        max_backpressure: usize,
        ping_interval: f64,
        ping_timeout: f64,
        open_timeout: f64,
        max_pending_upgrades: usize,
        compression: bool,
        max_message_rate: Option<f64>,
        max_connections: Option<usize>,
        max_connections_per_ip: Option<usize>,
        io_threads: Option<usize>,
        static_dir: Option<PathBuf>,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        history: Option<Vec<HistoryRule>>,
    ) -> PyResult<Self> {
        let history = convert::history_policies(history)?;
        let mut config = Config {
            bind,
            max_message_size,
            max_backpressure,
            ping_interval: convert::seconds(ping_interval, "ping_interval")?,
            ping_timeout: convert::seconds(ping_timeout, "ping_timeout")?,
            open_timeout: convert::seconds(open_timeout, "open_timeout")?,
            static_dir,
            max_pending_upgrades,
            compression,
            history,
            max_message_rate,
            max_connections,
            max_connections_per_ip,
            ..Config::default()
        };
        if let Some(n) = io_threads {
            config.io_threads = n;
        }
        let engine = ENGINE.clone();
        let server = gil::run(py, Work::Long, || {
            // Before binding: a bad certificate leaves no port taken.
            let tls = Tls::load(tls_cert.as_deref(), tls_key.as_deref()).map_err(errors::tls)?;
            warpsocket_core::Server::bind(engine, config, tls).map_err(errors::bind)
        })?;
        Ok(Server {
            inner: Mutex::new(server),
        })
    }

    /// `(host, port)` of every bound address, in the order given.
    fn addresses(&self) -> PyResult<Vec<(String, u16)>> {
        Ok(self
            .lock()?
            .local_addrs()
            .iter()
            .map(|a| (a.ip().to_string(), a.port()))
            .collect())
    }

    /// Registers a new worker queue; connections are assigned to it from now on.
    fn add_worker(&self) -> PyResult<WorkerQueue> {
        let inner = self.lock()?.workers().add().map_err(errors::os)?;
        Ok(WorkerQueue::new(inner))
    }

    /// Takes a worker out of the rotation and ends its connections at once:
    /// closed with 1011, or refused with 500 while still upgrading. Returns
    /// the number of connections ended.
    fn retire_worker(&self, worker_id: u32) -> PyResult<usize> {
        Ok(self.lock()?.retire_worker(worker_id))
    }

    /// Starts accepting connections; the flags say which handlers the
    /// worker module defines.
    #[pyo3(signature = (*, handle_open, handle_text, handle_binary))]
    fn serve(&self, handle_open: bool, handle_text: bool, handle_binary: bool) -> PyResult<()> {
        let handlers = Handlers {
            open: handle_open,
            text: handle_text,
            binary: handle_binary,
        };
        self.lock()?.serve(handlers).map_err(errors::os)
    }

    /// Stops accepting, closes every connection with 1001 and waits up to
    /// `timeout` seconds for them to finish.
    fn shutdown(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let timeout = convert::seconds(timeout.max(0.0), "timeout")?;
        gil::run(py, Work::Long, || {
            lock_for_shutdown(&self.inner).shutdown(timeout);
        });
        Ok(())
    }
}

/// The lock even if poisoned, which means an earlier call panicked while
/// holding it. Shutting down must still happen, or the runtime, its listeners
/// and every connection stay up: the core server's shutdown only takes what is
/// there, so it is safe on whatever state the panic left.
fn lock_for_shutdown<T>(inner: &Mutex<T>) -> MutexGuard<'_, T> {
    inner.lock().unwrap_or_else(|poisoned| {
        log::warn!(target: "warpsocket", "server state poisoned by an earlier panic; shutting down anyway");
        poisoned.into_inner()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_takes_a_lock_that_a_panic_poisoned() {
        let inner = Mutex::new(7);
        let _ = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let _held = inner.lock();
                    panic!("a bug while holding the server");
                })
                .join()
        });
        assert!(inner.is_poisoned());
        assert_eq!(*lock_for_shutdown(&inner), 7);
    }
}
