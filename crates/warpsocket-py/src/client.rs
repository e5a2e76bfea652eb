//! `warpsocket._core.Cluster`: the core's cluster client
//! (docs/api.md#cluster-client), for a process that is no node. The methods
//! convert their arguments as the module functions do and call the client;
//! those that wait for Redis release the GIL, the others (hand-offs to the
//! publisher) keep it. `warpsocket.Cluster` subclasses it, checking the
//! `history` option and adding the context manager.

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use warpsocket_core::cluster::Client;

use crate::convert::{self, CloseCode, CloseReason, Data, Delta, HistoryRule, Since};
use crate::errors;

/// A connection to a cluster's Redis server from a process that is not a
/// WarpSocket server.
#[pyclass(frozen, subclass, module = "warpsocket._core", name = "Cluster")]
pub(crate) struct Cluster {
    client: Client,
}

impl Cluster {
    /// The client, unless disconnected.
    fn client(&self) -> PyResult<&Client> {
        if self.client.is_disconnected() {
            return Err(PyRuntimeError::new_err(
                "this Cluster is disconnected: make a new one",
            ));
        }
        Ok(&self.client)
    }

    fn change_subscriptions(
        &self,
        target: &Bound<'_, PyAny>,
        channel: &Bound<'_, PyAny>,
        delta: i64,
    ) -> PyResult<Vec<u64>> {
        let targets = convert::targets(target, "target")?;
        let channel = convert::name_bytes(channel, "channel")?;
        self.client()?.subscribe(&targets, &channel, delta);
        Ok(Vec::new())
    }
}

#[pymethods]
impl Cluster {
    #[new]
    #[pyo3(signature = (url, history=None))]
    fn new(py: Python<'_>, url: &str, history: Option<Vec<HistoryRule>>) -> PyResult<Self> {
        let history = convert::history_policies(history)?;
        let client = py
            .detach(|| Client::connect(url, history))
            .map_err(errors::join_cluster)?;
        Ok(Cluster { client })
    }

    /// Hands `data` for `target` to Redis; returns the number of messages
    /// handed (0 while Redis is unreachable).
    fn send(&self, target: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<usize> {
        let targets = convert::targets(target, "target")?;
        let data = Data::extract(data, "data")?;
        let kind = data.kind();
        let payload = data.bytes("data")?;
        Ok(self.client()?.send(&targets, kind, payload))
    }

    /// Forwards the subscription to the sockets' nodes (a channel source:
    /// to every node); returns [] since only those nodes know the ids.
    #[pyo3(signature = (target, channel, delta=Delta::ONE), text_signature = "(self, target, channel, delta=1)")]
    fn subscribe(
        &self,
        target: &Bound<'_, PyAny>,
        channel: &Bound<'_, PyAny>,
        delta: Delta,
    ) -> PyResult<Vec<u64>> {
        self.change_subscriptions(target, channel, delta.0)
    }

    /// `subscribe(target, channel, -delta)`.
    #[pyo3(signature = (target, channel, delta=Delta::ONE), text_signature = "(self, target, channel, delta=1)")]
    fn unsubscribe(
        &self,
        target: &Bound<'_, PyAny>,
        channel: &Bound<'_, PyAny>,
        delta: Delta,
    ) -> PyResult<Vec<u64>> {
        self.change_subscriptions(target, channel, -delta.0)
    }

    /// Forwards a close to the socket's node; True when handed to Redis.
    #[pyo3(
        signature = (socket_id, code=CloseCode::NORMAL, reason=CloseReason::default()),
        text_signature = "(self, socket_id, code=1000, reason='')"
    )]
    fn close(
        &self,
        socket_id: &Bound<'_, PyAny>,
        code: CloseCode,
        reason: CloseReason,
    ) -> PyResult<bool> {
        let id = convert::socket_id(socket_id, "socket_id")?;
        Ok(self.client()?.close(id, code.0, &reason.0))
    }

    /// True if any node has subscribers for `channel` (False while Redis is
    /// unreachable).
    fn has_subscriptions(&self, py: Python<'_>, channel: &Bound<'_, PyAny>) -> PyResult<bool> {
        let channel = convert::name_bytes(channel, "channel")?;
        let client = self.client()?;
        Ok(py.detach(|| client.has_subscriptions(&channel)))
    }

    /// The value stored under `key`, or None.
    fn get_key<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let key = convert::name_bytes(key, "key")?;
        let client = self.client()?;
        let value = py
            .detach(|| client.get_key(&key))
            .map_err(errors::unreachable)?;
        Ok(value.map(|v| PyBytes::new(py, &v)))
    }

    /// Stores `value` under `key` (None deletes); returns the previous value.
    #[pyo3(signature = (key, value=None))]
    fn set_key<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
        value: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let key = convert::name_bytes(key, "key")?;
        let value = convert::optional_bytes(value, "value")?;
        let client = self.client()?;
        let previous = py
            .detach(|| client.set_key(&key, value.as_deref()))
            .map_err(errors::unreachable)?;
        Ok(previous.map(|v| PyBytes::new(py, &v)))
    }

    /// Compare-and-set; see docs/api.md#kv.
    #[pyo3(signature = (key, new_value=None, check_value=None))]
    fn set_key_if(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        new_value: Option<&Bound<'_, PyAny>>,
        check_value: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let key = convert::name_bytes(key, "key")?;
        let new_value = convert::optional_bytes(new_value, "new_value")?;
        let check_value = convert::optional_bytes(check_value, "check_value")?;
        let client = self.client()?;
        py.detach(|| client.set_key_if(&key, new_value.as_deref(), check_value.as_deref()))
            .map_err(errors::unreachable)
    }

    /// `(epoch, offset)` of a history channel's last message (0: none yet).
    fn position(&self, py: Python<'_>, channel: &Bound<'_, PyAny>) -> PyResult<(String, u64)> {
        let channel = convert::name_bytes(channel, "channel")?;
        let client = self.client()?;
        py.detach(|| client.position(&channel))
            .map_err(errors::unreachable)?
            .ok_or_else(|| no_history(&channel))
    }

    /// The kept messages `(offset, data)` of a history channel with an
    /// offset above `since`, oldest first, at most `limit`.
    #[pyo3(signature = (channel, since=Since::ZERO, limit=None), text_signature = "(self, channel, since=0, limit=None)")]
    fn history<'py>(
        &self,
        py: Python<'py>,
        channel: &Bound<'py, PyAny>,
        since: Since,
        limit: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Vec<(u64, Bound<'py, PyAny>)>> {
        let channel = convert::name_bytes(channel, "channel")?;
        let limit = convert::limit(limit, "limit")?;
        let client = self.client()?;
        let kept = py
            .detach(|| client.history(&channel, since.0, limit))
            .map_err(errors::unreachable)?
            .ok_or_else(|| no_history(&channel))?;
        Ok(convert::kept_messages(py, kept))
    }

    /// The members present in `channel` across the cluster: member -> info
    /// of its latest track.
    fn presence<'py>(
        &self,
        py: Python<'py>,
        channel: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let channel = convert::name_bytes(channel, "channel")?;
        let client = self.client()?;
        let members = py
            .detach(|| client.presence(&channel))
            .map_err(errors::unreachable)?;
        convert::members(py, members)
    }

    /// How many members are present in `channel` across the cluster.
    fn presence_count(&self, py: Python<'_>, channel: &Bound<'_, PyAny>) -> PyResult<usize> {
        let channel = convert::name_bytes(channel, "channel")?;
        let client = self.client()?;
        py.detach(|| client.presence_count(&channel))
            .map_err(errors::unreachable)
    }

    /// True once `disconnect()` was called.
    #[getter]
    fn disconnected(&self) -> bool {
        self.client.is_disconnected()
    }

    /// Closes the Redis connections and stops the client's thread; every
    /// method but this one raises RuntimeError afterwards.
    fn disconnect(&self, py: Python<'_>) {
        py.detach(|| self.client.disconnect());
    }
}

/// A history call on a channel that no rule of the client's `history` covers.
fn no_history(channel: &[u8]) -> PyErr {
    PyValueError::new_err(format!(
        "channel {:?} keeps no history: no prefix of this Cluster's history option matches it",
        String::from_utf8_lossy(channel)
    ))
}
