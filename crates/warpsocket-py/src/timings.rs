//! `HandlerTimings`: a worker thread's histograms of its handler calls (see
//! the core's `stats::Timings`), recorded without Python code per call and
//! read by `warpsocket.metrics` at scrape time.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use warpsocket_core::dispatch::ReadAt;
use warpsocket_core::stats::Timings;

/// One histogram's bucket counts per kind (not cumulative) and sums per kind.
type Histogram = (Vec<Vec<u64>>, Vec<f64>);

#[pyclass(frozen, module = "warpsocket._core")]
pub(crate) struct HandlerTimings {
    inner: Timings,
}

#[pymethods]
impl HandlerTimings {
    #[new]
    fn new(bounds: Vec<f64>) -> PyResult<Self> {
        if !bounds.is_sorted_by(|a, b| a < b) {
            return Err(PyValueError::new_err("bounds must be ascending"));
        }
        Ok(HandlerTimings {
            inner: Timings::new(&bounds),
        })
    }

    /// Counts one handler call of `kind`: `waited` seconds from reading its
    /// event to its start, `ran` seconds running. One thread only records.
    fn record(&self, kind: usize, waited: f64, ran: f64) -> PyResult<()> {
        if self.inner.record(kind, waited, ran) {
            Ok(())
        } else {
            Err(PyValueError::new_err(format!(
                "unknown handler kind {kind}"
            )))
        }
    }

    /// The worker's handler call with metrics on, timed here rather than in
    /// Python (a Python frame per event costs more than the call it times):
    /// runs `run(kind, socket_id, payload)`, `timed` being the drained
    /// `(payload, read_at)`, and records its queue wait and duration. When
    /// the handler returns an awaitable, returns `on_await(kind, awaitable,
    /// waited, start)` instead, which records through `finish` once awaited.
    fn call<'py>(
        &self,
        run: &Bound<'py, PyAny>,
        on_await: &Bound<'py, PyAny>,
        kind: &Bound<'py, PyAny>,
        socket_id: &Bound<'py, PyAny>,
        timed: (Bound<'py, PyAny>, u32),
    ) -> PyResult<Bound<'py, PyAny>> {
        let (payload, read_at) = timed;
        let start = ReadAt::now();
        let waited = ReadAt::from_micros(read_at).until(start).as_secs_f64();
        // The drained ints are passed on as they are: converting them back
        // would allocate a new int object per call.
        let pending = run.call1((kind, socket_id, payload))?;
        if pending.is_none() {
            let ran = start.until(ReadAt::now()).as_secs_f64();
            self.record(kind.extract()?, waited, ran)?;
            return Ok(pending);
        }
        on_await.call1((kind, pending, waited, start.micros()))
    }

    /// Counts an awaited handler call that `call` started at `start`.
    fn finish(&self, kind: usize, waited: f64, start: u32) -> PyResult<()> {
        let ran = ReadAt::from_micros(start)
            .until(ReadAt::now())
            .as_secs_f64();
        self.record(kind, waited, ran)
    }

    /// `(wait, ran)`, each `(counts, sums)`: per kind, the bucket counts
    /// (the last is +Inf; not cumulative) and the sum of the observations.
    fn snapshot(&self) -> (Histogram, Histogram) {
        let [wait, ran] = self.inner.snapshot().map(|kinds| kinds.into_iter().unzip());
        (wait, ran)
    }
}
