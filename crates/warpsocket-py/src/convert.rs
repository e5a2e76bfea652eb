//! Python values to core types: socket ids, message data, names, targets,
//! deltas, close codes and reasons. Raises TypeError for a value of the wrong
//! type; the rules a value must meet are the core's.
//!
//! May use the core's types and the error mapping; used by the module
//! functions.

use bytes::Bytes;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyByteArray, PyBytes, PyInt, PyList, PyMemoryView, PyString, PyTuple};
use warpsocket_core::{frame, Kind, Target};

use crate::errors;

/// A positive socket id; `bool` is refused although it is an `int`.
pub(crate) fn socket_id(value: &Bound<'_, PyAny>, arg: &str) -> PyResult<u64> {
    if value.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(format!(
            "{arg} must be an int socket id, not bool"
        )));
    }
    let id: i128 = value.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "{arg} must be an int socket id, not {}",
            type_name(value)
        ))
    })?;
    if id <= 0 || id > u64::MAX as i128 {
        return Err(PyValueError::new_err(format!(
            "{arg} must be a positive socket id, got {id}"
        )));
    }
    Ok(id as u64)
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

    pub(crate) fn bytes(&self) -> PyResult<&[u8]> {
        Ok(match self {
            Data::Text(s) => s.to_str()?.as_bytes(),
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
    Ok(Bytes::copy_from_slice(data.bytes()?))
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
        Err(_) => Err(PyTypeError::new_err(format!(
            "{arg} must be a socket id, a channel name, or a list of them, not {}",
            type_name(value)
        ))),
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

pub(crate) fn delta(delta: &Bound<'_, PyAny>) -> PyResult<i64> {
    if delta.is_instance_of::<PyBool>() || !delta.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "delta must be an int, not {}",
            type_name(delta)
        )));
    }
    let delta: i128 = delta.extract()?;
    Ok(delta.clamp(i64::MIN as i128 + 1, i64::MAX as i128) as i64)
}

/// A close code a server may send.
pub(crate) fn close_code(code: &Bound<'_, PyAny>) -> PyResult<u16> {
    if code.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(
            "code must be an int close code, not bool",
        ));
    }
    let code: i64 = code.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "code must be an int close code, not {}",
            type_name(code)
        ))
    })?;
    frame::check_close_code(code).map_err(errors::bad_close)
}

/// A close reason that fits in a close frame.
pub(crate) fn close_reason(reason: &Bound<'_, PyAny>) -> PyResult<String> {
    let reason = reason
        .cast::<PyString>()
        .map_err(|_| {
            PyTypeError::new_err(format!("reason must be str, not {}", type_name(reason)))
        })?
        .to_str()?
        .to_owned();
    frame::check_close_reason(&reason).map_err(errors::bad_close)?;
    Ok(reason)
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
