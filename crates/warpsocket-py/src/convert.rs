//! Python values to core types: socket ids, message data, names, targets,
//! deltas, close codes and reasons, durations, history policies (and kept
//! messages back to Python). Raises TypeError for a value
//! of the wrong type and ValueError, naming the argument, for one the core
//! cannot take (an int out of range, a str with a lone surrogate); the rules
//! a value must meet are the core's.

use std::time::Duration;

use bytes::Bytes;
use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyInt, PyList, PyMemoryView, PyString, PyTuple,
};
use warpsocket_core::history::{Message, Policies, Policy};
use warpsocket_core::presence::{Info, Members};
use warpsocket_core::{frame, Kind, Target};

use crate::errors;

/// A positive socket id; `bool` is refused although it is an `int`.
pub(crate) fn socket_id(value: &Bound<'_, PyAny>, arg: &str) -> PyResult<u64> {
    if value.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(format!(
            "{arg} must be an int socket id, not bool"
        )));
    }
    let out_of_range = || {
        PyValueError::new_err(format!(
            "{arg} must be a positive socket id below 2**64, got {}",
            repr(value)
        ))
    };
    match value.extract::<i128>() {
        Ok(id) => u64::try_from(id)
            .ok()
            .filter(|&id| id > 0)
            .ok_or_else(out_of_range),
        Err(e) if e.is_instance_of::<PyOverflowError>(value.py()) => Err(out_of_range()),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{arg} must be an int socket id, not {}",
            type_name(value)
        ))),
    }
}

fn repr(value: &Bound<'_, PyAny>) -> String {
    value
        .repr()
        .map_or_else(|_| "?".to_owned(), |r| r.to_string())
}

/// The UTF-8 of a str; a lone surrogate has none.
fn utf8<'a>(s: &'a Bound<'_, PyString>, arg: &str) -> PyResult<&'a str> {
    s.to_str().map_err(|_| {
        PyValueError::new_err(format!(
            "{arg} must be text that UTF-8 can encode, but it has a lone surrogate"
        ))
    })
}

pub(crate) fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

/// Message data: `str` is text, bytes-like is binary.
pub(crate) enum Data<'py> {
    Text(Bound<'py, PyString>),
    Bytes(Bound<'py, PyBytes>),
    Owned(Vec<u8>),
}

impl Data<'_> {
    pub(crate) fn extract<'py>(value: &Bound<'py, PyAny>, arg: &str) -> PyResult<Data<'py>> {
        if let Ok(s) = value.cast::<PyString>() {
            return Ok(Data::Text(s.clone()));
        }
        if let Ok(b) = value.cast::<PyBytes>() {
            return Ok(Data::Bytes(b.clone()));
        }
        if let Ok(b) = value.cast::<PyByteArray>() {
            return Ok(Data::Owned(b.to_vec()));
        }
        if value.is_instance_of::<PyMemoryView>() {
            let bytes = value.call_method0("tobytes")?;
            return Ok(Data::Owned(bytes.cast::<PyBytes>()?.as_bytes().to_vec()));
        }
        Err(PyTypeError::new_err(format!(
            "{arg} must be str or bytes-like, not {}",
            type_name(value)
        )))
    }

    pub(crate) fn kind(&self) -> Kind {
        match self {
            Data::Text(_) => Kind::Text,
            _ => Kind::Binary,
        }
    }

    /// The bytes to send or store; `arg` names the argument in an error.
    pub(crate) fn bytes(&self, arg: &str) -> PyResult<&[u8]> {
        Ok(match self {
            Data::Text(s) => utf8(s, arg)?.as_bytes(),
            Data::Bytes(b) => b.as_bytes(),
            Data::Owned(v) => v,
        })
    }
}

/// A channel name, key or value: `str` (as UTF-8) or bytes-like.
pub(crate) fn name_bytes(value: &Bound<'_, PyAny>, arg: &str) -> PyResult<Bytes> {
    let data = Data::extract(value, arg).map_err(|_| {
        PyTypeError::new_err(format!(
            "{arg} must be str or bytes-like, not {}",
            type_name(value)
        ))
    })?;
    Ok(Bytes::copy_from_slice(data.bytes(arg)?))
}

pub(crate) fn optional_bytes(
    value: Option<&Bound<'_, PyAny>>,
    arg: &str,
) -> PyResult<Option<Bytes>> {
    match value {
        Some(v) if !v.is_none() => Ok(Some(name_bytes(v, arg)?)),
        _ => Ok(None),
    }
}

/// One target element: an int is a socket id, str/bytes-like a channel.
fn target(value: &Bound<'_, PyAny>, arg: &str) -> PyResult<Target> {
    if value.is_instance_of::<PyInt>() || value.is_instance_of::<PyBool>() {
        return Ok(Target::Socket(socket_id(value, arg)?));
    }
    match name_bytes(value, arg) {
        Ok(name) => Ok(Target::Channel(name)),
        Err(e) if e.is_instance_of::<PyTypeError>(value.py()) => {
            Err(PyTypeError::new_err(format!(
                "{arg} must be a socket id, a channel name, or a list of them, not {}",
                type_name(value)
            )))
        }
        Err(e) => Err(e),
    }
}

/// What a send or subscribe `target` argument names.
pub(crate) fn targets(value: &Bound<'_, PyAny>, arg: &str) -> PyResult<Vec<Target>> {
    if let Ok(list) = value.cast::<PyList>() {
        return list.iter().map(|item| target(&item, arg)).collect();
    }
    if let Ok(tuple) = value.cast::<PyTuple>() {
        return tuple.iter().map(|item| target(&item, arg)).collect();
    }
    Ok(vec![target(value, arg)?])
}

/// Socket ids only: one, or a list (or tuple) of them (`recover`'s target).
pub(crate) fn socket_ids(value: &Bound<'_, PyAny>, arg: &str) -> PyResult<Vec<u64>> {
    if let Ok(list) = value.cast::<PyList>() {
        return list.iter().map(|item| socket_id_only(&item, arg)).collect();
    }
    if let Ok(tuple) = value.cast::<PyTuple>() {
        return tuple
            .iter()
            .map(|item| socket_id_only(&item, arg))
            .collect();
    }
    Ok(vec![socket_id_only(value, arg)?])
}

/// A socket id where a channel name is no target either.
fn socket_id_only(value: &Bound<'_, PyAny>, arg: &str) -> PyResult<u64> {
    if !value.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "{arg} must be a socket id or a list of them, not {}",
            type_name(value)
        )));
    }
    socket_id(value, arg)
}

/// A history offset: an int >= 0 (`bool` refused); one beyond any offset
/// is taken as the largest.
pub(crate) fn offset(value: &Bound<'_, PyAny>, arg: &str) -> PyResult<u64> {
    if value.is_instance_of::<PyBool>() || !value.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "{arg} must be an int offset, not {}",
            type_name(value)
        )));
    }
    if value.lt(0)? {
        return Err(PyValueError::new_err(format!(
            "{arg} must be an offset >= 0, got {}",
            repr(value)
        )));
    }
    Ok(value.extract::<u64>().unwrap_or(u64::MAX))
}

/// `history()`'s `since`: an offset, 0 by default.
pub(crate) struct Since(pub(crate) u64);

impl Since {
    pub(crate) const ZERO: Since = Since(0);
}

impl<'a, 'py> FromPyObject<'a, 'py> for Since {
    type Error = PyErr;

    fn extract(since: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        offset(&since, "since").map(Since)
    }
}

/// `history()`'s `limit`: None for no limit, else an int >= 0.
pub(crate) fn limit(value: Option<&Bound<'_, PyAny>>, arg: &str) -> PyResult<usize> {
    match value {
        Some(v) if !v.is_none() => {
            let n = offset(v, arg).map_err(|e| {
                if e.is_instance_of::<PyTypeError>(v.py()) {
                    PyTypeError::new_err(format!(
                        "{arg} must be an int or None, not {}",
                        type_name(v)
                    ))
                } else {
                    e
                }
            })?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        }
        _ => Ok(usize::MAX),
    }
}

/// `recover()`'s `since`: `(epoch, offset)`, as `position()` returns it.
pub(crate) fn since(value: &Bound<'_, PyAny>, arg: &str) -> PyResult<(String, u64)> {
    let wrong = || {
        PyTypeError::new_err(format!(
            "{arg} must be an (epoch, offset) tuple as position() returns, not {}",
            type_name(value)
        ))
    };
    let items: Vec<Bound<'_, PyAny>> = if let Ok(tuple) = value.cast::<PyTuple>() {
        tuple.iter().collect()
    } else if let Ok(list) = value.cast::<PyList>() {
        list.iter().collect()
    } else {
        return Err(wrong());
    };
    let [epoch, offset_value] = items.as_slice() else {
        return Err(wrong());
    };
    let epoch = epoch.cast::<PyString>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{arg}'s epoch must be a str, not {}",
            type_name(epoch)
        ))
    })?;
    let epoch = utf8(epoch, arg)?.to_owned();
    Ok((epoch, offset(offset_value, arg)?))
}

/// A subscription count change: any int, saturated to the counts' range
/// (no count gets anywhere near it).
pub(crate) struct Delta(pub(crate) i64);

impl Delta {
    pub(crate) const ONE: Delta = Delta(1);
}

impl<'a, 'py> FromPyObject<'a, 'py> for Delta {
    type Error = PyErr;

    fn extract(delta: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if delta.is_instance_of::<PyBool>() || !delta.is_instance_of::<PyInt>() {
            return Err(PyTypeError::new_err(format!(
                "delta must be an int, not {}",
                type_name(&delta)
            )));
        }
        Ok(Delta(match delta.extract::<i64>() {
            Ok(delta) => delta.max(-i64::MAX),
            Err(_) if delta.lt(0)? => -i64::MAX,
            Err(_) => i64::MAX,
        }))
    }
}

/// A close code a server may send.
pub(crate) struct CloseCode(pub(crate) u16);

impl CloseCode {
    pub(crate) const NORMAL: CloseCode = CloseCode(frame::close_code::NORMAL);
}

impl<'a, 'py> FromPyObject<'a, 'py> for CloseCode {
    type Error = PyErr;

    fn extract(code: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if code.is_instance_of::<PyBool>() {
            return Err(PyTypeError::new_err(
                "code must be an int close code, not bool",
            ));
        }
        let code = match code.extract::<i64>() {
            Ok(code) => code,
            Err(e) if e.is_instance_of::<PyOverflowError>(code.py()) => {
                return Err(PyValueError::new_err(format!(
                    "code must be a close code between 1000 and 4999, got {}",
                    repr(&code)
                )))
            }
            Err(_) => {
                return Err(PyTypeError::new_err(format!(
                    "code must be an int close code, not {}",
                    type_name(&code)
                )))
            }
        };
        frame::check_close_code(code)
            .map(CloseCode)
            .map_err(errors::bad_close)
    }
}

/// A close reason that fits in a close frame.
#[derive(Default)]
pub(crate) struct CloseReason(pub(crate) String);

impl<'a, 'py> FromPyObject<'a, 'py> for CloseReason {
    type Error = PyErr;

    fn extract(reason: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let text = reason.cast::<PyString>().map_err(|_| {
            PyTypeError::new_err(format!("reason must be str, not {}", type_name(&reason)))
        })?;
        let reason = utf8(&text, "reason")?.to_owned();
        frame::check_close_reason(&reason).map_err(errors::bad_close)?;
        Ok(CloseReason(reason))
    }
}

/// A duration in seconds: a finite, non-negative number that fits a `Duration`.
pub(crate) fn seconds(value: f64, arg: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!(
            "{arg} must be a finite number of seconds >= 0, got {value}"
        ))
    })
}

/// An optional socket id: None (or absent) stays None.
pub(crate) fn optional_socket_id(
    value: Option<&Bound<'_, PyAny>>,
    arg: &str,
) -> PyResult<Option<u64>> {
    match value {
        Some(v) if !v.is_none() => Ok(Some(socket_id(v, arg)?)),
        _ => Ok(None),
    }
}

/// A presence member: a non-empty `str`.
pub(crate) fn member<'a>(value: &'a Bound<'_, PyAny>, arg: &str) -> PyResult<&'a str> {
    let text = value.cast::<PyString>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{arg} must be a non-empty str, not {}",
            type_name(value)
        ))
    })?;
    let text = utf8(text, arg)?;
    if text.is_empty() {
        return Err(PyValueError::new_err(format!(
            "{arg} must be a non-empty str, got ''"
        )));
    }
    Ok(text)
}

/// A presence member's info: `str` (kept as text), bytes-like, or None.
pub(crate) fn info(value: Option<&Bound<'_, PyAny>>, arg: &str) -> PyResult<Option<Info>> {
    let Some(value) = value.filter(|v| !v.is_none()) else {
        return Ok(None);
    };
    let data = Data::extract(value, arg).map_err(|_| {
        PyTypeError::new_err(format!(
            "{arg} must be str, bytes-like or None, not {}",
            type_name(value)
        ))
    })?;
    let bytes = Bytes::copy_from_slice(data.bytes(arg)?);
    Ok(Some(match data.kind() {
        Kind::Text => Info::Text(bytes),
        Kind::Binary => Info::Binary(bytes),
    }))
}

/// One entry of the `history` option as `warpsocket` passes it (checked
/// there): `(prefix, size, ttl, stamp)`.
pub(crate) type HistoryRule = (Vec<u8>, usize, f64, bool);

/// The `history` option's rules as the core's policies.
pub(crate) fn history_policies(rules: Option<Vec<HistoryRule>>) -> PyResult<Policies> {
    let rules = rules
        .unwrap_or_default()
        .into_iter()
        .map(|(prefix, size, ttl, stamp)| {
            let ttl = seconds(ttl, "history")?;
            let policy = Policy {
                size: size.max(1),
                ttl,
                stamp,
            };
            Ok((Bytes::from(prefix), policy))
        })
        .collect::<PyResult<Vec<_>>>()?;
    Ok(Policies::new(rules))
}

/// Kept messages as `history()` returns them: `(offset, data)`, data str
/// for text and bytes for binary.
pub(crate) fn kept_messages<'py>(
    py: Python<'py>,
    kept: Vec<Message>,
) -> Vec<(u64, Bound<'py, PyAny>)> {
    kept.into_iter()
        .map(|(offset, kind, data)| {
            let data = match kind {
                // Text was sent as text, so it is UTF-8; lossy rather than a panic all the same.
                Kind::Text => PyString::new(py, &String::from_utf8_lossy(&data)).into_any(),
                Kind::Binary => PyBytes::new(py, &data).into_any(),
            };
            (offset, data)
        })
        .collect()
}

/// Members as `presence()` returns them: member → info (str, bytes or None).
pub(crate) fn members(py: Python<'_>, members: Members) -> PyResult<Bound<'_, PyDict>> {
    let dict = PyDict::new(py);
    for (member, info) in members {
        let info = match info {
            // Given as str, so UTF-8; lossy rather than a panic all the same.
            Some(Info::Text(text)) => PyString::new(py, &String::from_utf8_lossy(&text)).into_any(),
            Some(Info::Binary(data)) => PyBytes::new(py, &data).into_any(),
            None => py.None().into_bound(py),
        };
        dict.set_item(&*member, info)?;
    }
    Ok(dict)
}
