//! The names the Python layer shares with the engine, exported as plain
//! tables from their one definition in the core: handler kinds, close codes,
//! refusal statuses, the keys of `stats()` and the default bind.
//! `warpsocket.codes` makes its `IntEnum`s from these, and
//! `warpsocket.metrics` its metrics from `STATS_FIELDS`.

use pyo3::prelude::*;
use pyo3::types::PyTuple;
use warpsocket_core::config::DEFAULT_BIND;
use warpsocket_core::frame::close_code;
use warpsocket_core::handshake::status;
use warpsocket_core::stats::{self, HandlerKind, NO_CODE};

/// Adds the tables to `_core`, as tuples: nothing may change them.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let kinds = HandlerKind::ALL.map(|kind| (kind.name(), kind as u8));
    m.add("HANDLER_KINDS", PyTuple::new(py, kinds)?)?;
    // NO_CODE is never sent: it is what `stats()["closes"]` counts a close
    // frame without a code under, so it belongs with the codes there.
    let mut closes = close_code::ALL.to_vec();
    closes.push(("NO_CODE", NO_CODE));
    closes.sort_unstable_by_key(|&(_, code)| code);
    m.add("CLOSE_CODES", PyTuple::new(py, closes)?)?;
    let statuses = status::ALL.iter().map(|&(name, status, _)| (name, status));
    m.add("REFUSAL_STATUSES", PyTuple::new(py, statuses)?)?;
    let fields = stats::FIELDS
        .iter()
        .map(|f| (f.name, f.metric.kind(), f.metric.label(), f.help));
    m.add("STATS_FIELDS", PyTuple::new(py, fields)?)?;
    m.add("DEFAULT_BIND", DEFAULT_BIND)?;
    Ok(())
}
