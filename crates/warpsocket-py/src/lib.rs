//! `warpsocket._core`: converts Python arguments, releases the GIL where the
//! engine may block, and turns engine errors into Python exceptions. The
//! behaviour lives in `warpsocket-core`.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pyo3::exceptions::{PyConnectionError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyInt, PyList, PyMemoryView, PyString, PyTuple,
};
use warpsocket_core::{
    Config, Engine, Handlers, JoinError, Kind, OpenRequest, Payload, Target, Unreachable, Verdict,
    VirtualError, MAX_PREFIX,
};

/// The process-wide engine: sockets and counters outlive any one server.
static ENGINE: LazyLock<Arc<Engine>> = LazyLock::new(Engine::new);

/// Event kinds as seen by `warpsocket.worker`.
const EVENT_OPEN: u8 = 0;
const EVENT_TEXT: u8 = 1;
const EVENT_BINARY: u8 = 2;
const EVENT_CLOSE: u8 = 3;

/// A positive socket id; `bool` is refused although it is an `int`.
fn socket_id(value: &Bound<'_, PyAny>, arg: &str) -> PyResult<u64> {
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
        if value.is_instance_of::<PyMemoryView>() {
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

/// A channel name, key or value: `str` (as UTF-8) or bytes-like.
fn name_bytes(value: &Bound<'_, PyAny>, arg: &str) -> PyResult<Bytes> {
    let data = Data::extract(value, arg).map_err(|_| {
        PyTypeError::new_err(format!(
            "{arg} must be str or bytes-like, not {}",
            type_name(value)
        ))
    })?;
    Ok(Bytes::copy_from_slice(data.bytes()?))
}

fn optional_bytes(value: Option<&Bound<'_, PyAny>>, arg: &str) -> PyResult<Option<Bytes>> {
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
fn targets(value: &Bound<'_, PyAny>, arg: &str) -> PyResult<Vec<Target>> {
    if let Ok(list) = value.cast::<PyList>() {
        return list.iter().map(|item| target(&item, arg)).collect();
    }
    if let Ok(tuple) = value.cast::<PyTuple>() {
        return tuple.iter().map(|item| target(&item, arg)).collect();
    }
    Ok(vec![target(value, arg)?])
}

fn involves_channel(targets: &[Target]) -> bool {
    targets.iter().any(|t| matches!(t, Target::Channel(_)))
}

/// Sends `data` to `target`; returns the number of recipients.
#[pyfunction]
fn send(py: Python<'_>, target: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<usize> {
    let targets = targets(target, "target")?;
    let data = Data::extract(data, "data")?;
    let kind = data.kind();
    let payload = data.bytes()?;
    if targets.len() > 16 || involves_channel(&targets) {
        // Fan-outs run without the GIL so other threads keep going.
        return Ok(py.detach(|| ENGINE.send(&targets, kind, payload)));
    }
    Ok(ENGINE.send(&targets, kind, payload))
}

fn delta_arg(delta: &Bound<'_, PyAny>) -> PyResult<i64> {
    if delta.is_instance_of::<PyBool>() || !delta.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "delta must be an int, not {}",
            type_name(delta)
        )));
    }
    let delta: i128 = delta.extract()?;
    Ok(delta.clamp(i64::MIN as i128 + 1, i64::MAX as i128) as i64)
}

fn change_subscriptions(
    py: Python<'_>,
    target: &Bound<'_, PyAny>,
    channel: &Bound<'_, PyAny>,
    delta: i64,
) -> PyResult<Vec<u64>> {
    let targets = targets(target, "target")?;
    let channel = name_bytes(channel, "channel")?;
    Ok(py.detach(|| ENGINE.subscribe(&targets, &channel, delta)))
}

/// Adds `delta` to the subscription counts; returns the ids newly subscribed
/// (or, for a negative delta, unsubscribed).
#[pyfunction]
#[pyo3(signature = (target, channel, delta=None))]
fn subscribe(
    py: Python<'_>,
    target: &Bound<'_, PyAny>,
    channel: &Bound<'_, PyAny>,
    delta: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<u64>> {
    let delta = delta.map(delta_arg).transpose()?.unwrap_or(1);
    change_subscriptions(py, target, channel, delta)
}

/// `subscribe(target, channel, -delta)`.
#[pyfunction]
#[pyo3(signature = (target, channel, delta=None))]
fn unsubscribe(
    py: Python<'_>,
    target: &Bound<'_, PyAny>,
    channel: &Bound<'_, PyAny>,
    delta: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<u64>> {
    let delta = delta.map(delta_arg).transpose()?.unwrap_or(1);
    change_subscriptions(py, target, channel, -delta)
}

/// True if any subscriber of `channel` resolves to an open connection (in a
/// cluster, on any node: that asks Redis, so the GIL is released).
#[pyfunction]
fn has_subscriptions(py: Python<'_>, channel: &Bound<'_, PyAny>) -> PyResult<bool> {
    let channel = name_bytes(channel, "channel")?;
    Ok(py.detach(|| ENGINE.has_subscriptions(&channel)))
}

fn connection_error(e: Unreachable) -> PyErr {
    PyConnectionError::new_err(e.to_string())
}

/// Creates a virtual socket pointing at `socket_id`; returns its id.
#[pyfunction]
#[pyo3(signature = (socket_id, user_prefix=None))]
fn create_virtual_socket(
    py: Python<'_>,
    socket_id: &Bound<'_, PyAny>,
    user_prefix: Option<&Bound<'_, PyAny>>,
) -> PyResult<u64> {
    let id = self::socket_id(socket_id, "socket_id")?;
    let prefix = optional_bytes(user_prefix, "user_prefix")?;
    // Another node's socket: waits for that node's answer.
    py.detach(|| ENGINE.create_virtual_socket(id, prefix.as_deref()))
        .map_err(|e| match e {
            VirtualError::PrefixTooLong => PyValueError::new_err(format!(
                "user_prefix must be at most {MAX_PREFIX} bytes, got {}",
                prefix.as_ref().map_or(0, |p| p.len())
            )),
            VirtualError::NoSuchSocket => PyValueError::new_err(format!(
                "socket_id {id} is not an open connection or live virtual socket"
            )),
            VirtualError::Unreachable(why) => PyConnectionError::new_err(format!(
                "socket_id {id} belongs to another node, which did not answer: {why}"
            )),
        })
}

/// Deletes a virtual socket; with `expected_target`, only if it points there.
#[pyfunction]
#[pyo3(signature = (virtual_socket_id, expected_target=None))]
fn delete_virtual_socket(
    virtual_socket_id: &Bound<'_, PyAny>,
    expected_target: Option<&Bound<'_, PyAny>>,
) -> PyResult<bool> {
    let id = socket_id(virtual_socket_id, "virtual_socket_id")?;
    let expected = match expected_target {
        Some(t) if !t.is_none() => Some(socket_id(t, "expected_target")?),
        _ => None,
    };
    Ok(ENGINE.delete_virtual_socket(id, expected))
}

/// The value stored under `key`, or None.
#[pyfunction]
fn get_key<'py>(py: Python<'py>, key: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let key = name_bytes(key, "key")?;
    let value = kv_call(py, || ENGINE.get_key(&key))?;
    Ok(value.map(|v| PyBytes::new(py, &v)))
}

/// A kv call: in a cluster it waits for Redis, without holding the GIL.
fn kv_call<T: Send>(
    py: Python<'_>,
    call: impl FnOnce() -> Result<T, Unreachable> + Send,
) -> PyResult<T> {
    if ENGINE.node_id() == 0 {
        return call().map_err(connection_error);
    }
    py.detach(call).map_err(connection_error)
}

/// Stores `value` under `key` (None deletes); returns the previous value.
#[pyfunction]
#[pyo3(signature = (key, value=None))]
fn set_key<'py>(
    py: Python<'py>,
    key: &Bound<'py, PyAny>,
    value: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let key = name_bytes(key, "key")?;
    let value = optional_bytes(value, "value")?;
    let previous = kv_call(py, || ENGINE.set_key(&key, value.as_deref()))?;
    Ok(previous.map(|v| PyBytes::new(py, &v)))
}

/// Compare-and-set; see API.md §3.
#[pyfunction]
#[pyo3(signature = (key, new_value=None, check_value=None))]
fn set_key_if(
    py: Python<'_>,
    key: &Bound<'_, PyAny>,
    new_value: Option<&Bound<'_, PyAny>>,
    check_value: Option<&Bound<'_, PyAny>>,
) -> PyResult<bool> {
    let key = name_bytes(key, "key")?;
    let new_value = optional_bytes(new_value, "new_value")?;
    let check_value = optional_bytes(check_value, "check_value")?;
    kv_call(py, || {
        ENGINE.set_key_if(&key, new_value.as_deref(), check_value.as_deref())
    })
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

/// Joins the cluster whose Redis server is at `url`; returns this node's id.
#[pyfunction]
fn join_cluster(py: Python<'_>, url: &str) -> PyResult<u16> {
    py.detach(|| ENGINE.join_cluster(url)).map_err(|e| match e {
        JoinError::BadUrl { .. } => PyValueError::new_err(e.to_string()),
        _ => PyConnectionError::new_err(e.to_string()),
    })
}

/// Leaves the cluster (if in one); kv and sends are local again.
#[pyfunction]
fn leave_cluster(py: Python<'_>) {
    py.detach(|| ENGINE.leave_cluster());
}

/// Engine counters (the Python layer adds the per-worker list).
#[pyfunction]
fn counters(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let stats = ENGINE.stats();
    let get = warpsocket_core::stats::Counters::get;
    let dict = PyDict::new(py);
    dict.set_item("connections", ENGINE.connection_count())?;
    dict.set_item("virtual_sockets", ENGINE.virtual_socket_count())?;
    dict.set_item("channels", ENGINE.channel_count())?;
    dict.set_item("subscriptions", ENGINE.subscription_count())?;
    // In a cluster the count comes from Redis: -1 while it cannot be asked.
    let keys = kv_call(py, || ENGINE.key_count()).map_or(-1, |n| n as i64);
    dict.set_item("keys", keys)?;
    dict.set_item("messages_in", get(&stats.messages_in))?;
    dict.set_item("messages_out", get(&stats.messages_out))?;
    dict.set_item("bytes_in", get(&stats.bytes_in))?;
    dict.set_item("bytes_out", get(&stats.bytes_out))?;
    dict.set_item("backpressure_closes", get(&stats.backpressure_closes))?;
    dict.set_item("node_id", ENGINE.node_id())?;
    dict.set_item("cluster_messages_out", get(&stats.cluster_messages_out))?;
    dict.set_item("cluster_messages_in", get(&stats.cluster_messages_in))?;
    dict.set_item("cluster_send_failures", get(&stats.cluster_send_failures))?;
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

    /// Takes the waiting events (at most `max`) as `(kind, socket_id, payload)`
    /// tuples. Drained events count as handled unless held (see `hold`).
    #[pyo3(signature = (max=None))]
    fn drain<'py>(&self, py: Python<'py>, max: Option<usize>) -> PyResult<Bound<'py, PyList>> {
        let events = self.inner.drain_at_most(max.unwrap_or(usize::MAX));
        let list = PyList::empty(py);
        for event in events {
            let id = event.socket_id();
            let item = match event.payload {
                Payload::Open(open) => {
                    let OpenRequest { ip, path, headers } = *open;
                    let dict = PyDict::new(py);
                    for (name, value) in headers {
                        dict.set_item(name, value)?;
                    }
                    dict.set_item(":path", path)?;
                    let args =
                        PyTuple::new(py, [ip.into_pyobject(py)?.into_any(), dict.into_any()])?;
                    (EVENT_OPEN, id, args.into_any())
                }
                Payload::Text(data) => {
                    // SAFETY: the decoder only emits text that passed UTF-8 validation.
                    let text = unsafe { std::str::from_utf8_unchecked(&data) };
                    (EVENT_TEXT, id, PyString::new(py, text).into_any())
                }
                Payload::Binary(data) => (EVENT_BINARY, id, PyBytes::new(py, &data).into_any()),
                Payload::Close => (EVENT_CLOSE, id, py.None().into_bound(py)),
            };
            list.append(item)?;
        }
        Ok(list)
    }

    /// An event of `socket_id` waits behind another or is being awaited:
    /// it counts against the connection's backlog until `release`.
    fn hold(&self, socket_id: u64) {
        self.inner.hold(ENGINE.connection(socket_id).as_deref());
    }

    /// A held event's handler finished.
    fn release(&self, socket_id: u64) {
        self.inner.release(ENGINE.connection(socket_id).as_deref());
    }

    /// Wakes an idle worker as if an event waited, so a stuck one shows as stalled.
    fn probe(&self) {
        self.inner.probe();
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
    #[pyo3(signature = (bind, *, max_message_size, max_backpressure, ping_interval, ping_timeout, open_timeout, max_pending_upgrades=1024, io_threads=None, static_dir=None))]
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
        io_threads: Option<usize>,
        static_dir: Option<std::path::PathBuf>,
    ) -> PyResult<Self> {
        let mut config = Config {
            bind,
            max_message_size,
            max_backpressure,
            ping_interval: Duration::from_secs_f64(ping_interval),
            ping_timeout: Duration::from_secs_f64(ping_timeout),
            open_timeout: Duration::from_secs_f64(open_timeout),
            static_dir,
            max_pending_upgrades,
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

    /// Takes a worker out of the rotation and ends its connections at once:
    /// closed with 1011, or refused with 500 while still upgrading. Returns
    /// the number of connections ended.
    fn retire_worker(&self, worker_id: u32) -> PyResult<usize> {
        self.lock()?.workers().retire(worker_id);
        Ok(ENGINE.end_worker_connections(worker_id, 1011, "worker hung"))
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
    // The engine's log records (target "warpsocket") go to Python's logging;
    // levels are looked up on every record so a deployment can change them.
    // Another extension may have installed a bridge already: then keep it.
    let _ = pyo3_log::Logger::new(m.py(), pyo3_log::Caching::Loggers)?.install();
    m.add_class::<Server>()?;
    m.add_class::<WorkerQueue>()?;
    m.add_function(wrap_pyfunction!(send, m)?)?;
    m.add_function(wrap_pyfunction!(close, m)?)?;
    m.add_function(wrap_pyfunction!(subscribe, m)?)?;
    m.add_function(wrap_pyfunction!(unsubscribe, m)?)?;
    m.add_function(wrap_pyfunction!(has_subscriptions, m)?)?;
    m.add_function(wrap_pyfunction!(create_virtual_socket, m)?)?;
    m.add_function(wrap_pyfunction!(delete_virtual_socket, m)?)?;
    m.add_function(wrap_pyfunction!(get_key, m)?)?;
    m.add_function(wrap_pyfunction!(set_key, m)?)?;
    m.add_function(wrap_pyfunction!(set_key_if, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_open, m)?)?;
    m.add_function(wrap_pyfunction!(counters, m)?)?;
    m.add_function(wrap_pyfunction!(join_cluster, m)?)?;
    m.add_function(wrap_pyfunction!(leave_cluster, m)?)?;
    m.add("EVENT_OPEN", EVENT_OPEN)?;
    m.add("EVENT_TEXT", EVENT_TEXT)?;
    m.add("EVENT_BINARY", EVENT_BINARY)?;
    m.add("EVENT_CLOSE", EVENT_CLOSE)?;
    Ok(())
}
