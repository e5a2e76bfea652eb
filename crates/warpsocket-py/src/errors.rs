//! Every error of the core, turned into the Python exception docs/api.md#exceptions names:
//! the one place that knows the engine's error types.

use std::io;

use pyo3::exceptions::{PyConnectionError, PyOSError, PyValueError};
use pyo3::PyErr;
use warpsocket_core::frame::BadClose;
use warpsocket_core::tls::TlsError;
use warpsocket_core::{JoinError, PresenceError, Unreachable, VirtualError, MAX_PREFIX};

/// Redis (in a cluster) could not be asked.
pub(crate) fn unreachable(e: Unreachable) -> PyErr {
    PyConnectionError::new_err(e.to_string())
}

/// A count `stats()` cannot get (Redis unreachable) is reported as -1.
pub(crate) fn count_or_unknown(count: Result<usize, Unreachable>) -> i64 {
    count.map_or(-1, |n| n as i64)
}

/// A close code or reason that cannot go in a close frame.
pub(crate) fn bad_close(e: BadClose) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// `create_virtual_socket(id, prefix)` failed; `prefix_len` is the prefix's length.
pub(crate) fn virtual_socket(e: VirtualError, id: u64, prefix_len: usize) -> PyErr {
    match e {
        VirtualError::PrefixTooLong => PyValueError::new_err(format!(
            "user_prefix must be at most {MAX_PREFIX} bytes, got {prefix_len}"
        )),
        VirtualError::NoSuchSocket => PyValueError::new_err(format!(
            "socket_id {id} is not an open connection or live virtual socket"
        )),
        VirtualError::Unreachable(why) => PyConnectionError::new_err(format!(
            "socket_id {id} belongs to another node, which did not answer: {why}"
        )),
    }
}

/// Joining a cluster failed: a bad URL, or Redis could not be reached.
pub(crate) fn join_cluster(e: JoinError) -> PyErr {
    match e {
        JoinError::BadUrl { .. } => PyValueError::new_err(e.to_string()),
        _ => PyConnectionError::new_err(e.to_string()),
    }
}

/// `tls_cert`/`tls_key` cannot be used; the message starts with the one to fix.
pub(crate) fn tls(e: TlsError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Binding an address (or opening the static folder) failed.
pub(crate) fn bind(e: io::Error) -> PyErr {
    PyOSError::new_err((e.raw_os_error().unwrap_or(0), e.to_string()))
}

/// Any other I/O error of the server: the `OSError` subclass of its kind.
pub(crate) fn os(e: io::Error) -> PyErr {
    e.into()
}

/// A history call on a channel that no history policy covers.
pub(crate) fn no_history(channel: &[u8]) -> PyErr {
    PyValueError::new_err(format!(
        "channel {:?} keeps no history: no prefix of start()'s history option matches it",
        String::from_utf8_lossy(channel)
    ))
}

/// A presence call failed; `target` is `track`'s target, when it has one.
pub(crate) fn presence(e: PresenceError, target: Option<u64>) -> PyErr {
    match e {
        PresenceError::NoSuchSocket => PyValueError::new_err(format!(
            "target {} is not an open connection or live virtual socket",
            target.unwrap_or_default()
        )),
        PresenceError::Unreachable(e) => unreachable(e),
    }
}
