//! `HandlerTimings`: a worker thread's histograms of its handler calls (see
//! the core's `stats::Timings`), recorded without Python code per call and
//! read by `warpsocket.metrics` at scrape time.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
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

    /// `(wait, ran)`, each `(counts, sums)`: per kind, the bucket counts
    /// (the last is +Inf; not cumulative) and the sum of the observations.
    fn snapshot(&self) -> (Histogram, Histogram) {
        let [wait, ran] = self.inner.snapshot().map(|kinds| kinds.into_iter().unzip());
        (wait, ran)
    }
}
