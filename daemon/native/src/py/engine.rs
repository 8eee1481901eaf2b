//! The serving core for Python (`tensord._core.Engine`): the control plane hands it sessions
//! and models; a model's Python worker calls `ModelQueue.next_batch()` (GIL released while it
//! waits and gathers), runs the forward pass over the batch's arenas (buffers torch views
//! without a copy), and calls `Batch.complete(...)` or `Batch.fail(...)` once per batch.

use std::ffi::c_int;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

use super::buffer::Buffer;
use crate::desc::ErrorFields;
use crate::engine::batch::{Aligned, Batch, Output};
use crate::engine::queue::{Policy, Queue};
use crate::engine::session::Session;
use crate::engine::{Engine, Event};
use crate::error::Code;
use crate::signature::{Signature, Spec};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEngine>()?;
    m.add_class::<PyQueue>()?;
    m.add_class::<PyBatch>()?;
    m.add_class::<PyArena>()?;
    Ok(())
}

fn code_of(code: u32) -> PyResult<Code> {
    use Code::*;
    const ALL: [Code; 16] = [
        BadFrame,
        Version,
        BadMessage,
        UnknownModel,
        BadInput,
        TooLarge,
        Resource,
        Permission,
        ModelFailed,
        BadRecord,
        BadRequest,
        Deadline,
        Overloaded,
        ShuttingDown,
        Unsupported,
        Internal,
    ];
    ALL.iter()
        .copied()
        .find(|c| *c as u32 == code)
        .ok_or_else(|| PyValueError::new_err(format!("unknown error code {code}")))
}

#[pyclass(module = "tensord._core", name = "Engine", frozen)]
pub struct PyEngine {
    inner: Engine,
    next_id: AtomicU64,
}

#[pymethods]
impl PyEngine {
    #[new]
    fn new(spin_us: u64, max_memory: u64, max_memory_per_uid: u64) -> PyResult<PyEngine> {
        let inner = Engine::new(Duration::from_micros(spin_us), max_memory, max_memory_per_uid)
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        Ok(PyEngine { inner, next_id: AtomicU64::new(1) })
    }

    fn start(&self) -> PyResult<()> {
        self.inner.start().map_err(|e| PyOSError::new_err(e.to_string()))
    }

    fn stop(&self, py: Python<'_>) {
        py.detach(|| self.inner.stop());
    }

    fn alive(&self) -> bool {
        self.inner.alive()
    }

    /// An eventfd that is readable when take_events() has something.
    #[getter]
    fn events_fd(&self) -> i32 {
        self.inner.shared.events.fd
    }

    /// [("fatal" | "refused", session, code, message) | ("freed", session, 0, "")]
    fn take_events(&self) -> Vec<(&'static str, u64, u32, String)> {
        self.inner
            .shared
            .events
            .take()
            .into_iter()
            .map(|e| match e {
                Event::Fatal { session, code, message } => ("fatal", session, code as u32, message),
                Event::Freed { session } => ("freed", session, 0, String::new()),
                Event::Refused { session, code, message } => {
                    ("refused", session, code as u32, message)
                }
            })
            .collect()
    }

    /// Serves a session: maps `memfd` itself and takes ownership of the four eventfds (rd, rs,
    /// pd, ps; pass duplicates). Returns the session's id in this engine.
    #[allow(clippy::too_many_arguments)]
    fn add_session(
        &self,
        name: String,
        memfd: i32,
        request_ring: u64,
        response_ring: u64,
        efds: (i32, i32, i32, i32),
        uid: u32,
        high_priority: bool,
        park_limit: u64,
    ) -> PyResult<u64> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let sh = &self.inner.shared;
        let s = Session::new(
            id,
            name,
            memfd,
            request_ring,
            response_ring,
            [efds.0, efds.1, efds.2, efds.3],
            uid,
            high_priority,
            park_limit,
            sh.ledger.clone(),
            sh.events.clone(),
        )
        .map_err(|e| PyOSError::new_err(e.to_string()))?;
        self.inner.add_session(s).map_err(|e| PyOSError::new_err(e.to_string()))?;
        Ok(id)
    }

    /// The session's protocol version: below 5 its error responses carry no fields.
    fn set_session_version(&self, id: u64, version: u32) {
        if let Some(s) = self.inner.session(id) {
            s.error_fields.store(version >= 5, Ordering::Relaxed);
        }
    }

    fn end_session(&self, id: u64) {
        self.inner.end_session(id);
    }

    /// Nothing of the session is unread, queued, running or parked (true once it ended).
    fn session_idle(&self, id: u64) -> bool {
        self.inner.session(id).is_none_or(|s| s.idle())
    }

    fn session_served(&self, id: u64) -> u64 {
        self.inner.session(id).map_or(0, |s| s.served.load(Ordering::Relaxed))
    }

    fn sessions(&self) -> usize {
        self.inner.sessions()
    }

    /// Seconds: the longest the dispatcher spent on one session's records in one pass since
    /// start (every other session's intake waited that long).
    fn longest_pass(&self) -> f64 {
        self.inner.shared.longest_pass_ns.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// (parked response bytes of `uid`, in all).
    fn parked(&self, uid: u32) -> (u64, u64) {
        self.inner.shared.ledger.parked(uid)
    }

    /// Serves a model (replacing the version of that name, which drains): its compiled
    /// signature and scheduling policy. `identity`: the core answers it itself.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (name, version, inputs, max_batch, max_input_bytes, max_batch_size,
                        max_queue_delay_us, preferred_batch_sizes, max_queue, max_batch_bytes,
                        batching, identity, compute_bound = (0, String::new())))]
    fn set_model(
        &self,
        name: &str,
        version: u64,
        inputs: Vec<(String, String, Option<Vec<i64>>)>,
        max_batch: u64,
        max_input_bytes: u64,
        max_batch_size: u64,
        max_queue_delay_us: u64,
        preferred_batch_sizes: Vec<u64>,
        max_queue: u64,
        max_batch_bytes: u64,
        batching: bool,
        identity: bool,
        compute_bound: (u64, String),
    ) -> PyResult<PyQueue> {
        let specs = inputs
            .iter()
            .map(|(n, d, s)| Spec::parse(n, d, s.as_deref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(PyValueError::new_err)?;
        let sig = Signature::new(name, specs, max_batch, max_input_bytes)
            .with_compute_bound(compute_bound.0, &compute_bound.1);
        let policy = Policy {
            max_batch_size,
            max_queue_delay_us,
            preferred_batch_sizes,
            max_queue,
            max_batch_bytes,
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let meters = self.inner.shared.meters.clone();
        let q = Queue::new(id, name, version, sig, policy, batching, identity, meters);
        let q = Arc::new(q.with_events(self.inner.shared.events.clone()));
        if identity {
            crate::engine::identity::spawn(q.clone()).map_err(|e| {
                PyOSError::new_err(format!("cannot start the identity worker thread: {e}"))
            })?;
        }
        self.inner.set_model(q.clone());
        Ok(PyQueue { q })
    }

    fn remove_model(&self, name: &str) {
        self.inner.remove_model(name);
    }

    /// Per model: (name, {outcome: requests}, request, queue, compute and batch-size
    /// histograms as (per-bucket counts, sum), batch retries), for Prometheus at scrape time.
    #[allow(clippy::type_complexity)]
    fn metrics(&self) -> Vec<(String, Vec<(&'static str, u64)>, [(Vec<u64>, f64); 4], u64)> {
        self.inner
            .shared
            .meters
            .snapshot()
            .into_iter()
            .map(|(name, m)| {
                let h = |h: crate::engine::meter::Hist| (h.counts, h.sum);
                (
                    name,
                    m.outcomes.into_iter().collect(),
                    [h(m.request), h(m.queue), h(m.compute), h(m.batch)],
                    m.retries,
                )
            })
            .collect()
    }

    /// Answers every queued request with `code` (they never run); returns how many.
    fn cancel_queued(&self, py: Python<'_>, code: u32, message: &str) -> PyResult<usize> {
        let c = code_of(code)?;
        Ok(py.detach(|| self.inner.cancel_queued(c, message)))
    }
}

#[pyclass(module = "tensord._core", name = "ModelQueue", frozen)]
pub struct PyQueue {
    q: Arc<Queue>,
}

#[pymethods]
impl PyQueue {
    #[getter]
    fn name(&self) -> &str {
        &self.q.name
    }

    #[getter]
    fn version(&self) -> u64 {
        self.q.version
    }

    /// Requests waiting now.
    #[getter]
    fn length(&self) -> u64 {
        self.q.length()
    }

    /// The next batch (blocks with the GIL released); None once the model is retired and
    /// its queue drained. Expired requests are answered DEADLINE here and never returned.
    fn next_batch(&self, py: Python<'_>) -> Option<PyBatch> {
        let q = self.q.clone();
        py.detach(move || loop {
            let (id, jobs) = q.take()?;
            let mut b = Batch::gather(q.clone(), id, jobs);
            if b.is_empty() {
                b.close();
                continue;
            }
            return Some(b);
        })
        .map(PyBatch::new)
    }

    /// (served, failed, bad_input, rejected, expired, batches, [(size, count)], queue_us,
    ///  compute_us, max_queue_us, retried)
    #[allow(clippy::type_complexity)]
    fn stats(&self) -> (u64, u64, u64, u64, u64, u64, Vec<(u64, u64)>, u64, u64, u64, u64) {
        let s = self.q.stats().clone();
        (
            s.served,
            s.failed,
            s.bad_input,
            s.rejected,
            s.expired,
            s.batches,
            s.batch_sizes.into_iter().collect(),
            s.queue_us,
            s.compute_us,
            s.max_queue_us,
            s.retried,
        )
    }

    /// Seconds the oldest forward pass running now has run (0 when none).
    fn running_for(&self) -> f64 {
        self.q.running_for(Instant::now())
    }

    fn retire(&self) {
        self.q.retire();
    }
}

/// A batch arena: the bytes of one input for every request of the batch (buffer protocol,
/// writable, 64-byte aligned). Views of it keep it alive.
#[pyclass(module = "tensord._core", name = "Arena", frozen)]
pub struct PyArena {
    buf: Arc<Aligned>,
}

#[pymethods]
impl PyArena {
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let buf = &slf.get().buf;
        // Safety: `view` is the caller's; the memory lives as long as this object, which the
        // view holds a reference to (PyBuffer_FillInfo sets view->obj).
        let r = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                buf.ptr() as *mut std::ffi::c_void,
                buf.len() as ffi::Py_ssize_t,
                0,
                flags,
            )
        };
        if r < 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    fn __len__(&self) -> usize {
        self.buf.len()
    }
}

#[pyclass(module = "tensord._core", name = "Batch")]
pub struct PyBatch {
    b: Batch,
}

impl PyBatch {
    fn new(b: Batch) -> PyBatch {
        PyBatch { b }
    }
}

type OutTuple<'py> = (String, String, Vec<u64>, Bound<'py, PyAny>);

/// The outputs' buffers, held (so their memory stays put while the GIL is released).
fn buffers(outs: &[OutTuple<'_>]) -> PyResult<Vec<Buffer>> {
    outs.iter().map(|(_, _, _, data)| Buffer::get(data, false)).collect()
}

/// The core's view of outputs whose buffers `bufs` holds.
fn views<'a>(outs: &'a [OutTuple<'_>], bufs: &'a [Buffer]) -> Vec<Output<'a>> {
    outs.iter()
        .zip(bufs)
        .map(|((n, d, s, _), b)| Output { name: n, dtype: d, shape: s, data: b.as_slice() })
        .collect()
}

#[pymethods]
impl PyBatch {
    fn __len__(&self) -> usize {
        self.b.len()
    }

    /// Rows of each request.
    #[getter]
    fn rows(&self) -> Vec<u64> {
        self.b.members.iter().map(|m| m.rows).collect()
    }

    #[getter]
    fn model(&self) -> &str {
        &self.b.queue.name
    }

    /// Per input: (arena, dtype, [(offset, nbytes, shape) per request]).
    #[allow(clippy::type_complexity)]
    fn inputs(
        &self,
        py: Python<'_>,
    ) -> PyResult<Vec<(Py<PyArena>, &'static str, Vec<(u64, u64, Vec<u64>)>)>> {
        self.b
            .arenas
            .iter()
            .map(|a| {
                let spans =
                    a.spans.iter().zip(&a.shapes).map(|(&(o, n), s)| (o, n, s.clone())).collect();
                Ok((Py::new(py, PyArena { buf: a.buf.clone() })?, a.dtype.name(), spans))
            })
            .collect()
    }

    /// Seconds each request has waited since the daemon read it (for metrics).
    fn ages(&self) -> Vec<(f64, f64)> {
        let now = Instant::now();
        self.b
            .members
            .iter()
            .map(|m| {
                ((now - m.read_at).as_secs_f64(), (self.b.started - m.queued_at).as_secs_f64())
            })
            .collect()
    }

    /// Answers requests [lo, hi) with their rows of `outputs`: [(name, dtype, shape, buffer)],
    /// the model's contiguous outputs for exactly those requests. ValueError when the outputs
    /// do not have their rows (nothing is answered then).
    fn complete(
        &mut self,
        py: Python<'_>,
        lo: usize,
        hi: usize,
        outputs_: Vec<OutTuple<'_>>,
    ) -> PyResult<()> {
        let bufs = buffers(&outputs_)?;
        let outs = views(&outputs_, &bufs);
        let b = &mut self.b;
        py.detach(|| b.complete(lo, hi, &outs)).map_err(PyValueError::new_err)
    }

    /// Answers request `k` with outputs of its own (any dtype; `bytes` in wire encoding).
    fn complete_one(
        &mut self,
        py: Python<'_>,
        k: usize,
        outputs_: Vec<OutTuple<'_>>,
    ) -> PyResult<()> {
        let bufs = buffers(&outputs_)?;
        let outs = views(&outputs_, &bufs);
        let b = &mut self.b;
        py.detach(|| b.complete_one(k, &outs)).map_err(PyValueError::new_err)
    }

    /// Answers requests [lo, hi) with an error (SPEC §6 code) and, for protocol 5 sessions,
    /// the input, item and limit it is about.
    #[pyo3(signature = (lo, hi, code, message, input=None, item=None, limit=None))]
    #[allow(clippy::too_many_arguments)]
    fn fail(
        &mut self,
        lo: usize,
        hi: usize,
        code: u32,
        message: &str,
        input: Option<&str>,
        item: Option<u64>,
        limit: Option<u64>,
    ) -> PyResult<()> {
        let f = ErrorFields { input, item, limit };
        self.b.fail_fields(lo, hi, code_of(code)?, message, &f).map_err(PyValueError::new_err)
    }

    /// Which requests are not answered yet.
    fn open(&self) -> Vec<usize> {
        (0..self.b.len()).filter(|&k| !self.b.members[k].answered).collect()
    }

    /// One more forward pass ran to isolate failing requests.
    fn retried(&self) {
        self.b.queue.stats().retried += 1;
        self.b.queue.meters.retry(&self.b.queue.name);
    }

    /// Done: unanswered requests get INTERNAL; the pass stops counting as running.
    fn close(&mut self) {
        self.b.close();
    }

    fn __repr__(&self) -> String {
        format!("<Batch of {} requests for {:?}>", self.b.len(), self.b.queue.name)
    }
}
