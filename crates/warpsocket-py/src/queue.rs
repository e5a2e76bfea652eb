//! The worker queue: what a worker thread drains its events from, each turned
//! into the `(kind, socket_id, payload)` tuple `warpsocket.worker` reads,
//! and the hold/release bookkeeping of its events.

use std::sync::{Arc, Mutex, PoisonError};

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyList, PyString, PyTuple};
use warpsocket_core::stats::HandlerKind;
use warpsocket_core::{Event, OpenRequest, Payload};

use crate::ENGINE;

/// Events `warpsocket.worker` takes per drain (`_core.DRAIN_BATCH`); room for
/// this many stays in a queue's batch buffer between drains.
const DRAIN_BATCH: usize = 1024;

/// One worker thread's queue of events.
#[pyclass(frozen, module = "warpsocket._core")]
pub(crate) struct WorkerQueue {
    pub(crate) inner: Arc<warpsocket_core::WorkerQueue>,
    /// The events of a drain, kept from one drain to the next: a buffer of
    /// another size for every batch left holes of all sizes in the worker
    /// thread's heap (docs/benchmarks.md, "Over-aligned allocations and the
    /// worker queue's buffers").
    /// Taken out for the drain, so no lock is held while Python runs.
    batch: Mutex<Vec<Event>>,
}

impl WorkerQueue {
    pub(crate) fn new(inner: Arc<warpsocket_core::WorkerQueue>) -> Self {
        WorkerQueue {
            inner,
            batch: Mutex::new(Vec::new()),
        }
    }

    fn lock_batch(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        // Held for a swap only, so never poisoned in practice; and a buffer
        // is as good as any after a panic.
        self.batch.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl WorkerQueue {
    /// The drained `events` as the list `drain` returns; their buffer goes
    /// back for the next drain.
    fn to_list<'py>(
        &self,
        py: Python<'py>,
        mut events: Vec<Event>,
        timed: bool,
    ) -> PyResult<Bound<'py, PyList>> {
        // Sized once: appending would grow the list through a dozen sizes.
        let list = PyList::new(py, (0..events.len()).map(|_| py.None()))?;
        for (i, event) in events.drain(..).enumerate() {
            let id = event.socket_id();
            let read_at = event.read_at;
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
                    (HandlerKind::Open, id, args.into_any())
                }
                Payload::Text(data) => {
                    // SAFETY: the decoder only emits text that passed UTF-8 validation.
                    let text = unsafe { std::str::from_utf8_unchecked(&data) };
                    (HandlerKind::Text, id, PyString::new(py, text).into_any())
                }
                Payload::Binary(data) => {
                    (HandlerKind::Binary, id, PyBytes::new(py, &data).into_any())
                }
                Payload::Close => (HandlerKind::Close, id, py.None().into_bound(py)),
                Payload::Presence(change) => {
                    // A channel name that is not UTF-8 stays bytes.
                    let channel = match std::str::from_utf8(&change.channel) {
                        Ok(name) => PyString::new(py, name).into_any(),
                        Err(_) => PyBytes::new(py, &change.channel).into_any(),
                    };
                    let member = PyString::new(py, &change.member).into_any();
                    let joined = PyBool::new(py, change.joined).to_owned().into_any();
                    let args = PyTuple::new(py, [channel, member, joined])?;
                    (HandlerKind::Presence, id, args.into_any())
                }
            };
            let (kind, id, payload) = item;
            let kind = kind as u8;
            // The same tuple shape as untimed, so the worker's loop is one:
            // only the handler call it makes differs.
            if timed {
                list.set_item(i, (kind, id, (payload, read_at.micros())))?;
            } else {
                list.set_item(i, (kind, id, payload))?;
            }
        }
        if events.capacity() <= DRAIN_BATCH {
            *self.lock_batch() = events;
        }
        Ok(list)
    }
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

    /// Takes the waiting events (at most `max`), several turns at once, as
    /// `(kind, socket_id, payload)` tuples. With `timed`, each payload
    /// becomes `(payload, read_at)`: when the event was read, as
    /// `HandlerTimings.call` takes it. Drained events count as handled from
    /// `settle` (or the next drain) on, unless held (see `hold`).
    #[pyo3(signature = (max=None, timed=false))]
    fn drain<'py>(
        &self,
        py: Python<'py>,
        max: Option<usize>,
        timed: bool,
    ) -> PyResult<Bound<'py, PyList>> {
        let mut events = std::mem::take(&mut *self.lock_batch());
        self.inner
            .drain_at_most(max.unwrap_or(usize::MAX), &mut events);
        self.to_list(py, events, timed)
    }

    /// Like `drain`, but takes the oldest turn only: one waiting event of
    /// each connection that has any (at most `max`), then the next turns
    /// while fewer than `fill` are taken. A worker that runs each turn
    /// before it takes the next serves its connections fairly.
    #[pyo3(signature = (max=None, timed=false, fill=0))]
    fn drain_turn<'py>(
        &self,
        py: Python<'py>,
        max: Option<usize>,
        timed: bool,
        fill: usize,
    ) -> PyResult<Bound<'py, PyList>> {
        let mut events = std::mem::take(&mut *self.lock_batch());
        self.inner
            .drain_turn(max.unwrap_or(usize::MAX), fill, &mut events);
        self.to_list(py, events, timed)
    }

    /// The events last drained have run or are held.
    fn settle(&self) {
        self.inner.settle();
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

/// Adds the queue class and its drain batch size to `_core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<WorkerQueue>()?;
    m.add("DRAIN_BATCH", DRAIN_BATCH)?;
    Ok(())
}
