//! `warpsocket._core`: converts Python arguments, releases the GIL where the
//! engine may block, and turns engine errors into Python exceptions. The
//! behaviour lives in `warpsocket-core`.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyString, PyTuple};
use warpsocket_core::{Config, Engine, Event, Handlers, Kind, Verdict};

/// The process-wide engine: sockets and counters outlive any one server.
static ENGINE: LazyLock<Arc<Engine>> = LazyLock::new(Engine::new);

/// Event kinds as seen by `warpsocket.worker`.
const EVENT_OPEN: u8 = 0;
const EVENT_TEXT: u8 = 1;
const EVENT_BINARY: u8 = 2;
const EVENT_CLOSE: u8 = 3;

/// A positive socket id; `bool` is refused although it is an `int`.
fn socket_id(value: &Bound<'_, PyAny>, arg: &str) -> PyResult<u64> {
    if value.is_instance_of::<pyo3::types::PyBool>() {
        return Err(PyTypeError::new_err(format!(
            "{arg} must be an int socket id, not bool"
        )));
    }
    let id: i128 = value.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "{arg} must be an int socket id, not {}",
            value
                .get_type()
                .name()
                .map_or_else(|_| "?".to_owned(), |n| n.to_string())
        ))
    })?;
    if id <= 0 || id > u64::MAX as i128 {
        return Err(PyValueError::new_err(format!(
            "{arg} must be a positive socket id, got {id}"
        )));
    }
    Ok(id as u64)
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

/// Message data: `str` is text, bytes-like is binary.
enum Data<'py> {
    Text(Bound<'py, PyString>),
    Bytes(Bound<'py, PyBytes>),
    Owned(Vec<u8>),
}

impl Data<'_> {
    fn extract<'py>(value: &Bound<'py, PyAny>, arg: &str) -> PyResult<Data<'py>> {
        if let Ok(s) = value.cast::<PyString>() {
            return Ok(Data::Text(s.clone()));
        }
        if let Ok(b) = value.cast::<PyBytes>() {
            return Ok(Data::Bytes(b.clone()));
        }
        if let Ok(b) = value.cast::<PyByteArray>() {
            return Ok(Data::Owned(b.to_vec()));
        }
        if value.is_instance_of::<pyo3::types::PyMemoryView>() {
            let bytes = value.call_method0("tobytes")?;
            return Ok(Data::Owned(bytes.cast::<PyBytes>()?.as_bytes().to_vec()));
        }
        Err(PyTypeError::new_err(format!(
            "{arg} must be str or bytes-like, not {}",
            type_name(value)
        )))
    }

    fn kind(&self) -> Kind {
        match self {
            Data::Text(_) => Kind::Text,
            _ => Kind::Binary,
        }
    }

    fn bytes(&self) -> PyResult<&[u8]> {
        Ok(match self {
            Data::Text(s) => s.to_str()?.as_bytes(),
            Data::Bytes(b) => b.as_bytes(),
            Data::Owned(v) => v,
        })
    }
}

/// The socket ids a send target names.
fn target_ids(target: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    if let Ok(list) = target.cast::<PyList>() {
        let mut ids = Vec::with_capacity(list.len());
        for item in list.iter() {
            ids.push(socket_id(&item, "target")?);
        }
        return Ok(ids);
    }
    Ok(vec![socket_id(target, "target")?])
}

/// Sends `data` to `target`; returns the number of recipients.
#[pyfunction]
fn send(py: Python<'_>, target: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<usize> {
    let ids = target_ids(target)?;
    let data = Data::extract(data, "data")?;
    let kind = data.kind();
    let payload = data.bytes()?;
    if ids.len() > 64 {
        // Large fan-outs run without the GIL so other threads keep going.
        return Ok(py.detach(|| ENGINE.send(&ids, kind, payload)));
    }
    Ok(ENGINE.send(&ids, kind, payload))
}

/// Starts closing a connection; True if one was found open.
#[pyfunction]
#[pyo3(signature = (socket_id, code=None, reason=None))]
fn close(
    socket_id: &Bound<'_, PyAny>,
    code: Option<&Bound<'_, PyAny>>,
    reason: Option<&Bound<'_, PyAny>>,
) -> PyResult<bool> {
    let id = self::socket_id(socket_id, "socket_id")?;
    let code = match code {
        None => 1000,
        Some(code) => close_code(code)?,
    };
    let reason = match reason {
        None => String::new(),
        Some(reason) => reason
            .cast::<PyString>()
            .map_err(|_| {
                PyTypeError::new_err(format!("reason must be str, not {}", type_name(reason)))
            })?
            .to_str()?
            .to_owned(),
    };
    if reason.len() > 123 {
        return Err(PyValueError::new_err(
            "reason must be at most 123 bytes in UTF-8",
        ));
    }
    Ok(ENGINE.close(id, code, &reason))
}

/// A close code a server may send.
fn close_code(code: &Bound<'_, PyAny>) -> PyResult<u16> {
    if code.is_instance_of::<pyo3::types::PyBool>() {
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
    match u16::try_from(code) {
        Ok(code) if warpsocket_core::frame::is_valid_close_code(code) => Ok(code),
        _ => Err(PyValueError::new_err(format!(
            "code must be 1000-1003, 1007-1014 or 3000-4999, got {code}"
        ))),
    }
}

/// Delivers `handle_open`'s verdict: accept, or refuse with an HTTP status.
#[pyfunction]
fn resolve_open(socket_id: u64, accept: bool, status: u16) -> bool {
    let verdict = if accept {
        Verdict::Accept
    } else {
        Verdict::Refuse(status)
    };
    ENGINE.resolve_open(socket_id, verdict)
}

/// Engine counters (the Python layer adds the per-worker list).
#[pyfunction]
fn counters(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let stats = &ENGINE.stats;
    let get = warpsocket_core::stats::Counters::get;
    let dict = PyDict::new(py);
    dict.set_item("connections", ENGINE.connection_count())?;
    dict.set_item("messages_in", get(&stats.messages_in))?;
    dict.set_item("messages_out", get(&stats.messages_out))?;
    dict.set_item("bytes_in", get(&stats.bytes_in))?;
    dict.set_item("bytes_out", get(&stats.bytes_out))?;
    dict.set_item("backpressure_closes", get(&stats.backpressure_closes))?;
    Ok(dict)
}

/// One worker thread's queue of events.
#[pyclass(frozen, module = "warpsocket._core")]
struct WorkerQueue {
    inner: Arc<warpsocket_core::WorkerQueue>,
}

#[pymethods]
impl WorkerQueue {
    #[getter]
    fn id(&self) -> u32 {
        self.inner.id()
    }

    /// The descriptor that becomes readable when events wait.
    fn fileno(&self) -> i32 {
        self.inner.fd()
    }

    /// Takes every waiting event as `(kind, socket_id, payload)` tuples.
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let events = self.inner.drain();
        let list = PyList::empty(py);
        for event in events {
            let item = match event {
                Event::Open {
                    id,
                    ip,
                    path,
                    headers,
                } => {
                    let dict = PyDict::new(py);
                    for (name, value) in headers {
                        dict.set_item(name, value)?;
                    }
                    dict.set_item(":path", path)?;
                    (
                        EVENT_OPEN,
                        id,
                        PyTuple::new(py, [ip.into_pyobject(py)?.into_any(), dict.into_any()])?
                            .into_any(),
                    )
                }
                Event::Text { id, data } => {
                    // SAFETY: the decoder only emits text that passed UTF-8 validation.
                    let text = unsafe { std::str::from_utf8_unchecked(&data) };
                    (EVENT_TEXT, id, PyString::new(py, text).into_any())
                }
                Event::Binary { id, data } => {
                    (EVENT_BINARY, id, PyBytes::new(py, &data).into_any())
                }
                Event::Close { id } => (EVENT_CLOSE, id, py.None().into_bound(py)),
            };
            list.append(item)?;
        }
        Ok(list)
    }

    /// The handlers of these events finished (one socket id per event).
    fn finished(&self, socket_ids: Vec<u64>) {
        self.inner.finished(socket_ids.len());
        ENGINE.finished(&socket_ids);
    }

    /// Seconds the oldest waiting event has waited (0.0 when none waits).
    fn stalled_for(&self) -> f64 {
        self.inner.stalled_for().as_secs_f64()
    }

    #[getter]
    fn connections(&self) -> usize {
        self.inner.connections()
    }

    #[getter]
    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }
}

/// A bound (and, after `serve()`, accepting) server.
#[pyclass(frozen, module = "warpsocket._core")]
struct Server {
    inner: Mutex<warpsocket_core::Server>,
}

impl Server {
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, warpsocket_core::Server>> {
        self.inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("server state poisoned"))
    }
}

#[pymethods]
impl Server {
    #[new]
    #[pyo3(signature = (bind, *, max_message_size, max_backpressure, ping_interval, ping_timeout, open_timeout, io_threads=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        bind: Vec<String>,
        max_message_size: usize,
        max_backpressure: usize,
        ping_interval: f64,
        ping_timeout: f64,
        open_timeout: f64,
        io_threads: Option<usize>,
    ) -> PyResult<Self> {
        let mut config = Config {
            bind,
            max_message_size,
            max_backpressure,
            ping_interval: Duration::from_secs_f64(ping_interval),
            ping_timeout: Duration::from_secs_f64(ping_timeout),
            open_timeout: Duration::from_secs_f64(open_timeout),
            ..Config::default()
        };
        if let Some(n) = io_threads {
            config.io_threads = n;
        }
        let engine = ENGINE.clone();
        let server = py
            .detach(|| warpsocket_core::Server::bind(engine, config))
            .map_err(|e| PyOSError::new_err((e.raw_os_error().unwrap_or(0), e.to_string())))?;
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
        let inner = self.lock()?.workers().add()?;
        Ok(WorkerQueue { inner })
    }

    /// Takes a worker out of the rotation.
    fn retire_worker(&self, worker_id: u32) -> PyResult<bool> {
        Ok(self.lock()?.workers().retire(worker_id).is_some())
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
        Ok(self.lock()?.serve(handlers)?)
    }

    /// Stops accepting, closes every connection with 1001 and waits up to
    /// `timeout` seconds for them to finish.
    fn shutdown(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        py.detach(|| {
            if let Ok(mut server) = self.inner.lock() {
                server.shutdown(timeout);
            }
        });
        Ok(())
    }
}

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Server>()?;
    m.add_class::<WorkerQueue>()?;
    m.add_function(wrap_pyfunction!(send, m)?)?;
    m.add_function(wrap_pyfunction!(close, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_open, m)?)?;
    m.add_function(wrap_pyfunction!(counters, m)?)?;
    m.add("EVENT_OPEN", EVENT_OPEN)?;
    m.add("EVENT_TEXT", EVENT_TEXT)?;
    m.add("EVENT_BINARY", EVENT_BINARY)?;
    m.add("EVENT_CLOSE", EVENT_CLOSE)?;
    Ok(())
}
