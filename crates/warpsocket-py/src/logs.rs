//! The engine's log records on their way to Python's `logging`, without any
//! engine thread taking the GIL: an I/O or Redis thread that logs while a
//! worker holds the GIL would otherwise wait for that worker, and so would
//! every connection it serves.
//!
//! Records go into a bounded queue (when it is full they are dropped and
//! counted) and a descriptor is signalled; a Python thread
//! (`warpsocket.logbridge`) waits on it, takes the records and logs them.
//! Records of the engine (target `warpsocket`) are all queued, whatever the
//! level, and Python's level decides; other crates' only from WARN up, so
//! their per-connection chatter (rustls, say) costs nothing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use log::{Level, LevelFilter, Log, Metadata, Record};
use pyo3::prelude::*;
use warpsocket_core::Wakeup;

/// Records waiting for the Python thread; more are dropped (and counted).
const CAPACITY: usize = 4096;

/// One record as Python's `logging` wants it.
struct Entry {
    logger: String,
    level: u8,
    message: String,
    file: Option<String>,
    line: u32,
}

struct Bridge {
    entries: Mutex<VecDeque<Entry>>,
    dropped: AtomicU64,
    wakeup: Wakeup,
}

static BRIDGE: OnceLock<&'static Bridge> = OnceLock::new();

/// Python's number for a level.
fn python_level(level: Level) -> u8 {
    match level {
        Level::Error => 40,
        Level::Warn => 30,
        Level::Info => 20,
        Level::Debug => 10,
        Level::Trace => 5,
    }
}

fn is_engine(target: &str) -> bool {
    target == "warpsocket" || target.starts_with("warpsocket::")
}

impl Log for Bridge {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        is_engine(metadata.target()) || metadata.level() <= Level::Warn
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // Formatted before the lock: the lock is held for a push only.
        let entry = Entry {
            logger: record.target().replace("::", "."),
            level: python_level(record.level()),
            message: record.args().to_string(),
            file: record.file().map(str::to_owned),
            line: record.line().unwrap_or(0),
        };
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= CAPACITY {
            drop(entries);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = entries.is_empty();
        entries.push_back(entry);
        drop(entries);
        if was_empty {
            self.wakeup.signal();
        }
    }

    fn flush(&self) {}
}

/// The descriptor that turns readable when records wait.
#[pyfunction]
fn log_fd() -> Option<i32> {
    BRIDGE.get().map(|bridge| bridge.wakeup.fd())
}

/// A record for Python: `(logger, level, message, file, line)`.
type PyRecord = (String, u8, String, Option<String>, u32);

/// Takes the waiting records, and the number dropped since the last call.
#[pyfunction]
fn take_log_records() -> (Vec<PyRecord>, u64) {
    let Some(bridge) = BRIDGE.get() else {
        return (Vec::new(), 0);
    };
    bridge.wakeup.clear();
    let entries = std::mem::take(
        &mut *bridge
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    let records = entries
        .into_iter()
        .map(|e| (e.logger, e.level, e.message, e.file, e.line))
        .collect();
    (records, bridge.dropped.swap(0, Ordering::Relaxed))
}

/// Installs the bridge as the `log` crate's logger (unless another extension
/// installed one first: then that one stays) and adds its functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    if BRIDGE.get().is_none() {
        let bridge: &'static Bridge = Box::leak(Box::new(Bridge {
            entries: Mutex::new(VecDeque::new()),
            dropped: AtomicU64::new(0),
            wakeup: Wakeup::new()?,
        }));
        if log::set_logger(bridge).is_ok() {
            log::set_max_level(LevelFilter::Debug);
            let _ = BRIDGE.set(bridge);
        }
    }
    m.add_function(wrap_pyfunction!(log_fd, m)?)?;
    m.add_function(wrap_pyfunction!(take_log_records, m)?)?;
    Ok(())
}
