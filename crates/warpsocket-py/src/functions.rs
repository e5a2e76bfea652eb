//! The module functions of docs/api.md#functions (and the few the Python layer needs):
//! each converts its arguments, calls the engine under the GIL policy, and
//! converts the result or the error back.

use pyo3::prelude::*;
use pyo3::types::{IntoPyDict, PyBytes, PyDict};
use warpsocket_core::stats::{self, Counters, Live, Source};
use warpsocket_core::Verdict;

use crate::convert::{self, CloseCode, CloseReason, Data, Delta, Since};
use crate::errors;
use crate::gil::{self, Work};
use crate::ENGINE;

/// Sends `data` to `target`; returns the number of recipients.
#[pyfunction]
fn send(py: Python<'_>, target: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<usize> {
    let targets = convert::targets(target, "target")?;
    let data = Data::extract(data, "data")?;
    let kind = data.kind();
    let payload = data.bytes("data")?;
    Ok(gil::run(py, Work::Send(&targets), || {
        ENGINE.send(&targets, kind, payload)
    }))
}

fn change_subscriptions(
    py: Python<'_>,
    target: &Bound<'_, PyAny>,
    channel: &Bound<'_, PyAny>,
    delta: i64,
) -> PyResult<Vec<u64>> {
    let targets = convert::targets(target, "target")?;
    let channel = convert::name_bytes(channel, "channel")?;
    Ok(gil::run(py, Work::Long, || {
        ENGINE.subscribe(&targets, &channel, delta)
    }))
}

/// Adds `delta` to the subscription counts; returns the ids newly subscribed
/// (or, for a negative delta, unsubscribed).
#[pyfunction]
#[pyo3(signature = (target, channel, delta=Delta::ONE), text_signature = "(target, channel, delta=1)")]
fn subscribe(
    py: Python<'_>,
    target: &Bound<'_, PyAny>,
    channel: &Bound<'_, PyAny>,
    delta: Delta,
) -> PyResult<Vec<u64>> {
    change_subscriptions(py, target, channel, delta.0)
}

/// `subscribe(target, channel, -delta)`.
#[pyfunction]
#[pyo3(signature = (target, channel, delta=Delta::ONE), text_signature = "(target, channel, delta=1)")]
fn unsubscribe(
    py: Python<'_>,
    target: &Bound<'_, PyAny>,
    channel: &Bound<'_, PyAny>,
    delta: Delta,
) -> PyResult<Vec<u64>> {
    change_subscriptions(py, target, channel, -delta.0)
}

/// True if any subscriber of `channel` resolves to an open connection (in a
/// cluster, on any node: that asks Redis).
#[pyfunction]
fn has_subscriptions(py: Python<'_>, channel: &Bound<'_, PyAny>) -> PyResult<bool> {
    let channel = convert::name_bytes(channel, "channel")?;
    Ok(gil::run(py, Work::Long, || {
        ENGINE.has_subscriptions(&channel)
    }))
}

/// Creates a virtual socket pointing at `socket_id`; returns its id.
#[pyfunction]
#[pyo3(signature = (socket_id, user_prefix=None))]
fn create_virtual_socket(
    py: Python<'_>,
    socket_id: &Bound<'_, PyAny>,
    user_prefix: Option<&Bound<'_, PyAny>>,
) -> PyResult<u64> {
    let id = convert::socket_id(socket_id, "socket_id")?;
    let prefix = convert::optional_bytes(user_prefix, "user_prefix")?;
    // Another node's socket: waits for that node's answer.
    gil::run(py, Work::Long, || {
        ENGINE.create_virtual_socket(id, prefix.as_deref())
    })
    .map_err(|e| errors::virtual_socket(e, id, prefix.as_ref().map_or(0, |p| p.len())))
}

/// Deletes a virtual socket; with `expected_target`, only if it points there.
#[pyfunction]
#[pyo3(signature = (virtual_socket_id, expected_target=None))]
fn delete_virtual_socket(
    virtual_socket_id: &Bound<'_, PyAny>,
    expected_target: Option<&Bound<'_, PyAny>>,
) -> PyResult<bool> {
    let id = convert::socket_id(virtual_socket_id, "virtual_socket_id")?;
    let expected = convert::optional_socket_id(expected_target, "expected_target")?;
    Ok(ENGINE.delete_virtual_socket(id, expected))
}

/// Tracks the socket `target` in `channel` as `member` with `info`; True if
/// `member` became present (docs/api.md#presence). In a cluster it waits
/// for Redis's verdict, without the GIL.
#[pyfunction]
#[pyo3(signature = (target, channel, member, info=None))]
fn track(
    py: Python<'_>,
    target: &Bound<'_, PyAny>,
    channel: &Bound<'_, PyAny>,
    member: &Bound<'_, PyAny>,
    info: Option<&Bound<'_, PyAny>>,
) -> PyResult<bool> {
    let id = convert::socket_id(target, "target")?;
    let channel = convert::name_bytes(channel, "channel")?;
    let member = convert::member(member, "member")?;
    let info = convert::info(info, "info")?;
    gil::run(py, Work::Kv, || ENGINE.track(id, &channel, member, info))
        .map_err(|e| errors::presence(e, Some(id)))
}

/// Untracks the socket `target` from `channel`; True if its member left.
#[pyfunction]
fn untrack(
    py: Python<'_>,
    target: &Bound<'_, PyAny>,
    channel: &Bound<'_, PyAny>,
) -> PyResult<bool> {
    let id = convert::socket_id(target, "target")?;
    let channel = convert::name_bytes(channel, "channel")?;
    Ok(gil::run(py, Work::Kv, || ENGINE.untrack(id, &channel)))
}

/// The members present in `channel`: member -> info of its latest track
/// (str, bytes or None).
#[pyfunction]
fn presence<'py>(py: Python<'py>, channel: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    let channel = convert::name_bytes(channel, "channel")?;
    let members = gil::run(py, Work::Kv, || ENGINE.presence(&channel))
        .map_err(|e| errors::presence(e, None))?;
    convert::members(py, members)
}

/// How many members are present in `channel`.
#[pyfunction]
fn presence_count(py: Python<'_>, channel: &Bound<'_, PyAny>) -> PyResult<usize> {
    let channel = convert::name_bytes(channel, "channel")?;
    gil::run(py, Work::Kv, || ENGINE.presence_count(&channel))
        .map_err(|e| errors::presence(e, None))
}

/// The value stored under `key`, or None.
#[pyfunction]
fn get_key<'py>(py: Python<'py>, key: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let key = convert::name_bytes(key, "key")?;
    let value = gil::run(py, Work::Kv, || ENGINE.get_key(&key)).map_err(errors::unreachable)?;
    Ok(value.map(|v| PyBytes::new(py, &v)))
}

/// Stores `value` under `key` (None deletes); returns the previous value.
#[pyfunction]
#[pyo3(signature = (key, value=None))]
fn set_key<'py>(
    py: Python<'py>,
    key: &Bound<'py, PyAny>,
    value: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let key = convert::name_bytes(key, "key")?;
    let value = convert::optional_bytes(value, "value")?;
    let previous = gil::run(py, Work::Kv, || ENGINE.set_key(&key, value.as_deref()))
        .map_err(errors::unreachable)?;
    Ok(previous.map(|v| PyBytes::new(py, &v)))
}

/// Compare-and-set; see docs/api.md#kv.
#[pyfunction]
#[pyo3(signature = (key, new_value=None, check_value=None))]
fn set_key_if(
    py: Python<'_>,
    key: &Bound<'_, PyAny>,
    new_value: Option<&Bound<'_, PyAny>>,
    check_value: Option<&Bound<'_, PyAny>>,
) -> PyResult<bool> {
    let key = convert::name_bytes(key, "key")?;
    let new_value = convert::optional_bytes(new_value, "new_value")?;
    let check_value = convert::optional_bytes(check_value, "check_value")?;
    gil::run(py, Work::Kv, || {
        ENGINE.set_key_if(&key, new_value.as_deref(), check_value.as_deref())
    })
    .map_err(errors::unreachable)
}

/// `(epoch, offset)` of a history channel's last message (0: none yet).
#[pyfunction]
fn position(py: Python<'_>, channel: &Bound<'_, PyAny>) -> PyResult<(String, u64)> {
    let channel = convert::name_bytes(channel, "channel")?;
    // Waits for the channel's lock, which a send to many holds a while.
    gil::run(py, Work::Long, || ENGINE.position(&channel))
        .map_err(errors::unreachable)?
        .map(|(epoch, offset)| (epoch.to_string(), offset))
        .ok_or_else(|| errors::no_history(&channel))
}

/// The kept messages `(offset, data)` of a history channel with an offset
/// above `since`, oldest first, at most `limit`.
#[pyfunction]
#[pyo3(signature = (channel, since=Since::ZERO, limit=None), text_signature = "(channel, since=0, limit=None)")]
fn history<'py>(
    py: Python<'py>,
    channel: &Bound<'py, PyAny>,
    since: Since,
    limit: Option<&Bound<'py, PyAny>>,
) -> PyResult<Vec<(u64, Bound<'py, PyAny>)>> {
    let channel = convert::name_bytes(channel, "channel")?;
    let limit = convert::limit(limit, "limit")?;
    let kept = gil::run(py, Work::Long, || ENGINE.history(&channel, since.0, limit))
        .map_err(errors::unreachable)?
        .ok_or_else(|| errors::no_history(&channel))?;
    Ok(convert::kept_messages(py, kept))
}

/// Subscribes `target` to a history channel and delivers it what it missed
/// since `(epoch, offset)`, atomically with live sends; True when nothing
/// was missed that is not kept.
#[pyfunction]
fn recover(
    py: Python<'_>,
    target: &Bound<'_, PyAny>,
    channel: &Bound<'_, PyAny>,
    since: &Bound<'_, PyAny>,
) -> PyResult<bool> {
    let targets = convert::socket_ids(target, "target")?;
    let channel = convert::name_bytes(channel, "channel")?;
    let (epoch, offset) = convert::since(since, "since")?;
    gil::run(py, Work::Long, || {
        ENGINE.recover(&targets, &channel, (&epoch, offset))
    })
    .map_err(errors::unreachable)?
    .ok_or_else(|| errors::no_history(&channel))
}

/// Starts closing a connection; True if one was found open.
#[pyfunction]
#[pyo3(
    signature = (socket_id, code=CloseCode::NORMAL, reason=CloseReason::default()),
    text_signature = "(socket_id, code=1000, reason='')"
)]
fn close(socket_id: &Bound<'_, PyAny>, code: CloseCode, reason: CloseReason) -> PyResult<bool> {
    let id = convert::socket_id(socket_id, "socket_id")?;
    Ok(ENGINE.close(id, code.0, &reason.0))
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
    gil::run(py, Work::Long, || ENGINE.join_cluster(url)).map_err(errors::join_cluster)
}

/// Leaves the cluster (if in one); kv and sends are local again.
#[pyfunction]
fn leave_cluster(py: Python<'_>) {
    gil::run(py, Work::Long, || ENGINE.leave_cluster());
}

/// Engine counters (the Python layer adds the per-worker list): every key
/// of the core's `stats::FIELDS`, in its order.
#[pyfunction]
fn counters(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let stats = ENGINE.stats();
    let dict = PyDict::new(py);
    for field in stats::FIELDS {
        let value = match field.source {
            Source::Counter(counter) => Counters::get(counter(stats)).into_pyobject(py)?.into_any(),
            Source::Codes(snapshot) => snapshot(stats).into_py_dict(py)?.into_any(),
            Source::Live(live) => match live_value(py, live) {
                Some(value) => value.into_pyobject(py)?.into_any(),
                None => continue,
            },
        };
        dict.set_item(field.name, value)?;
    }
    Ok(dict)
}

/// A value the engine computes; None for one that is absent (Redis's state
/// outside a cluster).
fn live_value(py: Python<'_>, live: Live) -> Option<i64> {
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    Some(match live {
        Live::Connections => count(ENGINE.connection_count()),
        Live::VirtualSockets => count(ENGINE.virtual_socket_count()),
        Live::Channels => count(ENGINE.channel_count()),
        Live::Subscriptions => count(ENGINE.subscription_count()),
        // In a cluster the count comes from Redis.
        Live::Keys => errors::count_or_unknown(gil::run(py, Work::Kv, || ENGINE.key_count())),
        Live::NodeId => i64::from(ENGINE.node_id()),
        Live::RedisConnected => i64::from(ENGINE.redis_connected()?),
        Live::HistoryChannels => count(ENGINE.history_channel_count()),
        Live::HistoryMessages => count(ENGINE.history_message_count()),
        Live::PresenceMembers => count(ENGINE.presence_member_count()),
    })
}

/// Adds the module functions to `_core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(send, m)?)?;
    m.add_function(wrap_pyfunction!(close, m)?)?;
    m.add_function(wrap_pyfunction!(subscribe, m)?)?;
    m.add_function(wrap_pyfunction!(unsubscribe, m)?)?;
    m.add_function(wrap_pyfunction!(has_subscriptions, m)?)?;
    m.add_function(wrap_pyfunction!(create_virtual_socket, m)?)?;
    m.add_function(wrap_pyfunction!(delete_virtual_socket, m)?)?;
    m.add_function(wrap_pyfunction!(track, m)?)?;
    m.add_function(wrap_pyfunction!(untrack, m)?)?;
    m.add_function(wrap_pyfunction!(presence, m)?)?;
    m.add_function(wrap_pyfunction!(presence_count, m)?)?;
    m.add_function(wrap_pyfunction!(get_key, m)?)?;
    m.add_function(wrap_pyfunction!(set_key, m)?)?;
    m.add_function(wrap_pyfunction!(set_key_if, m)?)?;
    m.add_function(wrap_pyfunction!(position, m)?)?;
    m.add_function(wrap_pyfunction!(history, m)?)?;
    m.add_function(wrap_pyfunction!(recover, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_open, m)?)?;
    m.add_function(wrap_pyfunction!(counters, m)?)?;
    m.add_function(wrap_pyfunction!(join_cluster, m)?)?;
    m.add_function(wrap_pyfunction!(leave_cluster, m)?)?;
    Ok(())
}
