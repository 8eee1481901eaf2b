//! A batch: the requests a worker took, their inputs gathered into one arena per input, and
//! how their answers are written.
//!
//! Gathering copies each request's rows out of its session's ring into the arena (one memcpy
//! per input per request) and releases the request record at once, so the client has its ring
//! space back before the forward pass. Completing splits the model's contiguous outputs by the
//! requests' rows: per request a response descriptor, one memcpy per output, and at most one
//! wake-up per session for the whole batch. Every request of a batch is answered exactly once:
//! what the worker did not answer when it closes the batch gets INTERNAL.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::queue::{Job, Queue};
use super::session::{Response, Session};
use crate::desc::{plan_outputs, ErrorFields};
use crate::dtype::DType;
use crate::error::{Code, RequestError};
use crate::pyrepr;
use crate::signature;

/// A 64-byte aligned, zero-initialised byte buffer.
pub struct Aligned {
    ptr: *mut u8,
    len: usize,
}

unsafe impl Send for Aligned {}
unsafe impl Sync for Aligned {}

impl Aligned {
    pub fn new(len: usize) -> Aligned {
        let layout = Layout::from_size_align(len.max(64), 64).expect("arena size");
        // Safety: a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory for a batch arena of {len} bytes");
        Aligned { ptr, len }
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // Safety: len bytes allocated and initialised.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // Safety: allocated with this layout in new().
        unsafe { dealloc(self.ptr, Layout::from_size_align(self.len.max(64), 64).unwrap()) };
    }
}

/// One input of the batch: every request's bytes of it, back to back.
pub struct Arena {
    pub buf: Arc<Aligned>,
    pub dtype: DType,
    /// Per request: (offset, length) in `buf`, and its shape.
    pub spans: Vec<(u64, u64)>,
    pub shapes: Vec<Vec<u64>>,
}

/// A request of the batch.
pub struct Member {
    pub session: Arc<Session>,
    pub request_id: u64,
    pub rows: u64,
    pub read_at: Instant,
    pub queued_at: Instant,
    pub answered: bool,
}

pub struct Batch {
    pub queue: Arc<Queue>,
    pub id: u64,
    pub members: Vec<Member>,
    pub arenas: Vec<Arena>,
    pub started: Instant,
    closed: bool,
}

/// An output of the model for a range of the batch's requests (or for one request).
pub struct Output<'a> {
    pub name: &'a str,
    pub dtype: &'a str,
    pub shape: &'a [u64],
    pub data: &'a [u8],
}

/// The smallest ring capacity SPEC §3.2 allows that holds a record of `n` bytes.
fn ring_for(n: u64) -> u64 {
    n.max(65536).next_power_of_two()
}

/// The first failed values check of a job's inputs that intake left to the worker.
fn unchecked_values(job: &Job) -> Option<RequestError> {
    job.inputs.iter().find_map(|i| {
        let name = i.unchecked.as_deref()?;
        let count = i.dims.iter().product();
        signature::check_values_in(job.session.region(), i.offset, i.dtype, i.nbytes, count, name)
            .expect("checked at intake")
            .err()
    })
}

impl Batch {
    /// Gathers the jobs a worker took: stopped sessions' jobs are dropped, expired ones
    /// answered DEADLINE (never computed); the rest are copied into arenas and their records
    /// released. Runs without the GIL.
    pub fn gather(queue: Arc<Queue>, id: u64, jobs: Vec<Job>) -> Batch {
        let now = Instant::now();
        let mut live: Vec<Job> = Vec::with_capacity(jobs.len());
        // Values intake left to this worker (a large bytes or bool tensor) are checked before
        // the stats lock is taken: the dispatcher takes it too, and a 64 MiB table takes
        // milliseconds to read.
        let jobs: Vec<(Job, Option<RequestError>)> = jobs
            .into_iter()
            .map(|j| {
                let runs = !j.session.is_stopped() && j.deadline.is_none_or(|d| now <= d);
                let bad = if runs { unchecked_values(&j) } else { None };
                (j, bad)
            })
            .collect();
        {
            let mut st = queue.stats();
            for (job, bad) in jobs {
                let waited = now.saturating_duration_since(job.queued_at);
                let us = waited.as_micros() as u64;
                st.queue_us += us;
                st.max_queue_us = st.max_queue_us.max(us);
                if job.session.is_stopped() {
                    job.session.respond_error(job.request_id, Code::ShuttingDown, "", None);
                } else if job.deadline.is_some_and(|d| now > d) {
                    st.expired += 1;
                    let msg = format!(
                        "the request's time budget ran out after {:.1} ms in model {}'s queue, \
                         before it ran; give it a longer deadline or add instances",
                        waited.as_secs_f64() * 1e3,
                        pyrepr::str(&queue.name)
                    );
                    queue.meters.request(
                        &queue.name,
                        "DEADLINE",
                        Some(job.read_at.elapsed()),
                        Some(waited),
                    );
                    job.session.respond_error(
                        job.request_id,
                        Code::Deadline,
                        &msg,
                        Some(job.position),
                    );
                    job.session.wake_client();
                } else if let Some(e) = bad {
                    st.bad_input += 1;
                    if let Some(events) = &queue.events {
                        events.refused(job.session.id, e.code, &e.message);
                    }
                    queue.meters.request(
                        &queue.name,
                        e.code.name(),
                        Some(job.read_at.elapsed()),
                        Some(waited),
                    );
                    let f = ErrorFields { input: e.input.as_deref(), item: None, limit: e.limit };
                    job.session.respond_error_fields(
                        job.request_id,
                        e.code,
                        &e.message,
                        &f,
                        Some(job.position),
                    );
                    job.session.wake_client();
                } else {
                    live.push(job);
                }
            }
            if !live.is_empty() {
                st.batches += 1;
                *st.batch_sizes.entry(live.len() as u64).or_default() += 1;
            }
        }
        let n_inputs = live.first().map_or(0, |j| j.inputs.len());
        let mut arenas = Vec::with_capacity(n_inputs);
        for i in 0..n_inputs {
            let total: u64 = live.iter().map(|j| j.inputs[i].nbytes).sum();
            let buf = Aligned::new(total as usize);
            let mut spans = Vec::with_capacity(live.len());
            let mut shapes = Vec::with_capacity(live.len());
            let mut at = 0u64;
            for j in &live {
                let inp = &j.inputs[i];
                if inp.nbytes > 0 {
                    // Safety: `at + nbytes <= total` by construction; the record is held (not
                    // released) and its bytes lie inside the session's mapping (checked at
                    // intake), which the job's Arc keeps mapped.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            buf.ptr().add(at as usize),
                            inp.nbytes as usize,
                        )
                    };
                    j.session.region().copy_out(inp.offset, dst).expect("checked at intake");
                }
                spans.push((at, inp.nbytes));
                shapes.push(inp.dims.clone());
                at += inp.nbytes;
            }
            arenas.push(Arena {
                buf: Arc::new(buf),
                dtype: live[0].inputs[i].dtype,
                spans,
                shapes,
            });
        }
        let mut members = Vec::with_capacity(live.len());
        for j in live {
            j.session.release(j.position); // gathered: the client may reuse the space
            members.push(Member {
                session: j.session,
                request_id: j.request_id,
                rows: j.rows,
                read_at: j.read_at,
                queued_at: j.queued_at,
                answered: false,
            });
        }
        Batch { queue, id, members, arenas, started: Instant::now(), closed: false }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    fn check_range(&self, lo: usize, hi: usize) -> Result<(), String> {
        if lo >= hi || hi > self.members.len() {
            return Err(format!(
                "requests [{lo}, {hi}) are not a range of this batch of {}",
                self.members.len()
            ));
        }
        if let Some(j) = self.members[lo..hi].iter().position(|m| m.answered) {
            return Err(format!("request {} of the batch is answered already", lo + j));
        }
        Ok(())
    }

    /// Answers requests [lo, hi) with their rows of `outputs` (the model's contiguous
    /// outputs for exactly those requests' rows, in order). Err: the outputs do not have
    /// those rows (the caller answers MODEL_FAILED).
    pub fn complete(&mut self, lo: usize, hi: usize, outputs: &[Output<'_>]) -> Result<(), String> {
        self.check_range(lo, hi)?;
        let total: u64 = self.members[lo..hi].iter().map(|m| m.rows).sum();
        for o in outputs {
            let n = o.shape.first().copied().unwrap_or(0);
            if n != total || o.dtype == "bytes" {
                return Err(format!(
                    "model {} returned {n} rows for a batch of {total}: a batched model must keep \
                     dimension 0 (set max_batch_size = 1 if it cannot)",
                    pyrepr::str(&self.queue.name)
                ));
            }
            if total > 0 && o.data.len() as u64 % total != 0 {
                return Err(format!(
                    "output {} has {} bytes for {total} rows",
                    pyrepr::str(o.name),
                    o.data.len()
                ));
            }
        }
        let mut woken: HashMap<u64, Arc<Session>> = HashMap::new();
        let mut row = 0u64;
        let mut shapes: Vec<Vec<u64>> = outputs.iter().map(|o| o.shape.to_vec()).collect();
        let mut slices: Vec<&[u8]> = Vec::with_capacity(outputs.len());
        for k in lo..hi {
            let rows = self.members[k].rows;
            slices.clear();
            for (o, shape) in outputs.iter().zip(shapes.iter_mut()) {
                let per_row = (o.data.len() as u64).checked_div(total).unwrap_or(0);
                let a = (row * per_row) as usize;
                let b = ((row + rows) * per_row) as usize;
                slices.push(&o.data[a..b]);
                shape[0] = rows;
            }
            let outs: Vec<Output<'_>> = outputs
                .iter()
                .zip(shapes.iter())
                .zip(slices.iter())
                .map(|((o, shape), data)| Output { name: o.name, dtype: o.dtype, shape, data })
                .collect();
            self.answer(k, &outs, &mut woken);
            row += rows;
        }
        self.queue.stats().served += (hi - lo) as u64;
        self.meter(lo, hi, "ok");
        for s in woken.values() {
            s.wake_client();
        }
        Ok(())
    }

    fn meter(&self, lo: usize, hi: usize, outcome: &'static str) {
        let now = Instant::now();
        let times: Vec<_> = self.members[lo..hi]
            .iter()
            .map(|m| (now - m.read_at, self.started.saturating_duration_since(m.queued_at)))
            .collect();
        self.queue.meters.requests(&self.queue.name, outcome, &times);
    }

    /// Answers request `k` with outputs of its own (a handler's per-request split; any dtype,
    /// `bytes` tensors in their wire encoding).
    pub fn complete_one(&mut self, k: usize, outputs: &[Output<'_>]) -> Result<(), String> {
        self.check_range(k, k + 1)?;
        let mut woken = HashMap::new();
        self.answer(k, outputs, &mut woken);
        self.queue.stats().served += 1;
        self.meter(k, k + 1, "ok");
        for s in woken.values() {
            s.wake_client();
        }
        Ok(())
    }

    fn answer(&mut self, k: usize, outs: &[Output<'_>], woken: &mut HashMap<u64, Arc<Session>>) {
        let m = &mut self.members[k];
        m.answered = true;
        let specs: Vec<(&str, &str, &[u64], u64)> =
            outs.iter().map(|o| (o.name, o.dtype, o.shape, o.data.len() as u64)).collect();
        let plan = plan_outputs(&specs);
        let cap = m.session.response_capacity();
        if plan.record_len > cap {
            let msg = format!(
                "the outputs need a {}-byte response record but this session's response ring \
                 holds {cap} bytes: connect with a response ring of at least {} bytes (Go: \
                 WithRingSize)",
                plan.record_len,
                ring_for(plan.record_len)
            );
            m.session.respond_error(m.request_id, Code::TooLarge, &msg, None);
        } else {
            let payloads: Vec<(u64, &[u8])> =
                plan.offsets.iter().copied().zip(outs.iter().map(|o| o.data)).collect();
            m.session.respond(
                &Response {
                    request_id: m.request_id,
                    record_len: plan.record_len,
                    desc: &plan.descriptor,
                    payloads: &payloads,
                },
                None,
                true,
            );
        }
        woken.entry(m.session.id).or_insert_with(|| m.session.clone());
    }

    /// Answers requests [lo, hi) with an error.
    pub fn fail(&mut self, lo: usize, hi: usize, code: Code, message: &str) -> Result<(), String> {
        self.fail_fields(lo, hi, code, message, &ErrorFields::default())
    }

    /// Answers requests [lo, hi) with an error that says what it is about (protocol 5).
    pub fn fail_fields(
        &mut self,
        lo: usize,
        hi: usize,
        code: Code,
        message: &str,
        f: &ErrorFields<'_>,
    ) -> Result<(), String> {
        self.check_range(lo, hi)?;
        let mut woken: HashMap<u64, Arc<Session>> = HashMap::new();
        for m in &mut self.members[lo..hi] {
            m.answered = true;
            m.session.respond_error_fields(m.request_id, code, message, f, None);
            woken.entry(m.session.id).or_insert_with(|| m.session.clone());
        }
        let mut st = self.queue.stats();
        if code == Code::BadInput {
            st.bad_input += (hi - lo) as u64;
        } else {
            st.failed += (hi - lo) as u64;
        }
        drop(st);
        self.meter(lo, hi, code.name());
        for s in woken.values() {
            s.wake_client();
        }
        Ok(())
    }

    /// The batch is done: whatever is unanswered gets INTERNAL (a daemon fault), the forward
    /// pass stops counting as running, its time goes to the model's stats.
    pub fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        let open: Vec<usize> =
            (0..self.members.len()).filter(|&k| !self.members[k].answered).collect();
        for k in open {
            let _ = self.fail(
                k,
                k + 1,
                Code::Internal,
                "the daemon dropped this request inside its batch (a daemon fault, in its log); \
                 the model may have run",
            );
        }
        let took = self.started.elapsed();
        self.queue.stats().compute_us += took.as_micros() as u64;
        if !self.members.is_empty() {
            self.queue.meters.batch(&self.queue.name, self.members.len(), took);
        }
        self.queue.finished(self.id);
        // Let go of the sessions now: an ended one is freed when its last job goes, not when
        // the Python object of this batch does.
        self.members.clear();
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.close();
    }
}
