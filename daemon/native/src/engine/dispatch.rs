//! The dispatcher: one thread waits on every session's request-data and response-space
//! eventfds in one epoll call, and turns records into jobs.
//!
//! An epoll event carries the session's id, never a descriptor number: the session is looked
//! up before anything is read, and a session's descriptors are only closed when the last
//! reference to it goes, so a stale event can never read a reused descriptor. Each pass takes
//! at most PER_PASS records of a session (PADs included) before the next session's turn.
//! Intake checks every field against SPEC §7 and the model's compiled signature; a request
//! that cannot run is answered here, and the built-in `identity` is answered here too.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::identity;
use super::queue::{Input, Job, Queue, Refused};
use super::session::{Response, Session};
use super::{Event, Shared};
use crate::desc::{self, plan_outputs, ErrorFields, TensorRef, MAX_DESCRIPTOR};
use crate::dtype::DType;
use crate::error::{Code, RequestError};
use crate::layout::RECORD_HEADER;
use crate::pyrepr;
use crate::ring::RecordInfo;
use crate::signature;
use crate::wake;

/// Records taken from one session per pass (PADs count: the ring counts every record).
pub const PER_PASS: usize = 16;
/// ...taken this many at a time, until the pass has used PASS_BUDGET.
const CHUNK: usize = 4;
const PASS_BUDGET: Duration = Duration::from_micros(500);
/// The wake-up eventfd's epoll token; sessions use (id << 1) | is_response_space.
pub const WAKE: u64 = u64::MAX;

pub fn run(sh: Arc<Shared>) {
    let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut ready: Vec<Arc<Session>> = Vec::new();
    let mut recs: Vec<RecordInfo> = Vec::with_capacity(PER_PASS);
    let mut scratch = Scratch::default();
    while !sh.stopping.load(Ordering::Acquire) {
        if ready.is_empty() && !sh.spin.is_zero() {
            spin(&sh, &mut ready);
        }
        let timeout = if ready.is_empty() { -1 } else { 0 };
        // Safety: a valid epoll fd and a buffer of events.len() entries.
        let n =
            unsafe { libc::epoll_wait(sh.ep, events.as_mut_ptr(), events.len() as i32, timeout) };
        if n < 0 {
            continue; // EINTR
        }
        if !sh.spin.is_zero() && n > 0 {
            ask_for_posts(&sh, false);
        }
        for ev in &events[..n as usize] {
            event(&sh, ev.u64, &mut ready);
        }
        let pass = std::mem::take(&mut ready);
        for s in pass {
            if serve(&sh, &s, &mut recs, &mut scratch) {
                ready.push(s);
            }
        }
    }
}

/// One epoll event. The session is looked up by the id the event carries before anything is
/// read; while we hold it, its descriptors cannot be closed. An event of a session that has
/// ended meanwhile is dropped unread, whatever now has its descriptors' numbers.
pub(super) fn event(sh: &Shared, token: u64, ready: &mut Vec<Arc<Session>>) {
    if token == WAKE {
        wake::drain(sh.wake);
        return;
    }
    let Some(s) = sh.session(token >> 1) else { return };
    if token & 1 == 1 {
        wake::drain(s.efd(super::session::EFD_RESP_SPACE));
        s.flush();
    } else {
        wake::drain(s.efd(super::session::EFD_REQ_DATA));
    }
    if !ready.iter().any(|r| r.id == s.id) {
        ready.push(s);
    }
}

/// With a spin budget, poll every session's request ring before sleeping (clients do not
/// post while we spin); then ask for posts again (SPEC §4.5) and re-check.
fn spin(sh: &Shared, ready: &mut Vec<Arc<Session>>) {
    let sessions = sh.all_sessions();
    let tails: Vec<_> = sessions.iter().map(|s| (s.tail_word(), s.consumer_read())).collect();
    if wake::spin_any(&tails, sh.spin).is_some() {
        ready.extend(sessions.iter().filter(|s| s.pending()).cloned());
        return;
    }
    ask_for_posts(sh, true);
    for s in &sessions {
        if s.pending() {
            ready.push(s.clone());
        }
    }
    if !ready.is_empty() {
        ask_for_posts(sh, false);
    }
}

fn ask_for_posts(sh: &Shared, on: bool) {
    for s in sh.all_sessions() {
        if !s.is_stopped() {
            s.want_posts(on);
        }
    }
}

#[derive(Default)]
struct Scratch {
    desc: Vec<u8>,
    order: Vec<usize>,
    payload: Vec<u8>,
}

/// One bounded slice of a session's records; true when it has more waiting. Bounded in count
/// (PER_PASS records, PADs included) and in time (PASS_BUDGET): whatever a session's records
/// are, the next session's turn comes soon.
fn serve(sh: &Shared, s: &Arc<Session>, recs: &mut Vec<RecordInfo>, sc: &mut Scratch) -> bool {
    let start = Instant::now();
    let mut taken = 0;
    let mut woke = false;
    while taken < PER_PASS && start.elapsed() < PASS_BUDGET {
        if let Err(e) = s.take(CHUNK.min(PER_PASS - taken), recs) {
            // A corrupt ring: this session ends (the control plane closes its connection), no
            // other session is affected. Records read before the corrupt one are dropped too.
            s.stop();
            sh.events.push(Event::Fatal {
                session: s.id,
                code: Code::BadRecord,
                message: e.to_string(),
            });
            return false;
        }
        if recs.is_empty() {
            break;
        }
        taken += recs.len().max(1);
        woke |= take_all(sh, s, recs, sc);
    }
    if woke {
        s.wake_client();
    }
    sh.longest_pass_ns.fetch_max(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    s.pending()
}

/// Intake of the records one take() returned; true when a response was written here.
fn take_all(sh: &Shared, s: &Arc<Session>, recs: &[RecordInfo], sc: &mut Scratch) -> bool {
    let mut woke = false;
    for rec in recs.iter() {
        match intake(sh, s, rec, sc) {
            Ok(Some((q, job))) => submit(sh, q, job),
            Ok(None) => woke = true, // answered here (identity)
            Err((model, e, read_at)) => {
                // Not the model's failures, but requests of it all the same (metrics); the
                // caller's bad input counts in the model's bad_input as Prometheus counts it
                // (issue 17.9: `tensord stats`, Prometheus and the log agree).
                if let Some(q) = model.as_ref() {
                    if matches!(e.code, Code::BadInput | Code::BadRequest | Code::TooLarge) {
                        q.stats().bad_input += 1;
                    }
                }
                let name = model.as_ref().map_or("-", |q| q.name.as_str());
                sh.meters.request(name, e.code.name(), Some(read_at.elapsed()), None);
                sh.events.refused(s.id, e.code, &e.message);
                let f = ErrorFields { input: e.input.as_deref(), item: None, limit: e.limit };
                s.respond_error_fields(rec.request_id, e.code, &e.message, &f, Some(rec.position));
                woke = true;
            }
        }
    }
    woke
}

fn submit(sh: &Shared, q: Arc<Queue>, job: Job) {
    let s = job.session.clone();
    let refused = match q.put(job) {
        Ok(None) => return,
        Ok(Some(evicted)) => {
            // Another session holds more of the queue: its newest request makes room.
            let msg = format!(
                "model {} has {} requests queued (max_queue in its config) and this session \
                 holds the most of them: retry later, or send fewer at once",
                pyrepr::str(&q.name),
                q.policy.max_queue
            );
            q.meters.request(&q.name, "OVERLOADED", Some(evicted.read_at.elapsed()), None);
            let es = evicted.session.clone();
            es.respond_error(evicted.request_id, Code::Overloaded, &msg, Some(evicted.position));
            es.wake_client();
            return;
        }
        Err(Refused::Retired(job)) => {
            // A reload replaced the model between lookup and put: the new version takes it.
            match sh.model(&q.name) {
                Some(now) if !Arc::ptr_eq(&now, &q) => match now.put(*job) {
                    Ok(evicted) => {
                        if let Some(e) = evicted {
                            e.session.respond_error(
                                e.request_id,
                                Code::Overloaded,
                                "the queue is full",
                                Some(e.position),
                            );
                            e.session.wake_client();
                        }
                        return;
                    }
                    Err(r) => r,
                },
                _ => Refused::Retired(job),
            }
        }
        Err(r) => r,
    };
    match refused {
        Refused::Full(job, max) => {
            q.meters.request(&q.name, "OVERLOADED", Some(job.read_at.elapsed()), None);
            let msg = format!(
                "model {} has {max} requests queued (max_queue in its config): retry later, or \
                 add instances",
                pyrepr::str(&q.name)
            );
            s.respond_error(job.request_id, Code::Overloaded, &msg, Some(job.position));
        }
        Refused::Retired(job) => {
            q.meters.request("-", "UNKNOWN_MODEL", Some(job.read_at.elapsed()), None);
            s.respond_error(
                job.request_id,
                Code::UnknownModel,
                &unknown(sh, &q.name),
                Some(job.position),
            );
        }
    }
    s.wake_client();
}

fn unknown(sh: &Shared, name: &str) -> String {
    let mut names = sh.model_names();
    names.sort();
    format!(
        "no model named {}; this daemon serves {} (list them with Models())",
        pyrepr::str(name),
        pyrepr::str_list(names.iter().map(|s| s.as_str()))
    )
}

type IntakeError = (Option<Arc<Queue>>, RequestError, Instant);

/// Decodes and checks one request record: the job and its model's queue, or Ok(None) when it
/// was answered here.
fn intake(
    sh: &Shared,
    s: &Arc<Session>,
    rec: &RecordInfo,
    sc: &mut Scratch,
) -> Result<Option<(Arc<Queue>, Job)>, IntakeError> {
    let read_at = Instant::now();
    let dlen = rec.desc_len as usize;
    if dlen > MAX_DESCRIPTOR {
        return Err((
            None,
            RequestError::bad_request(format!(
                "descriptor of {dlen} bytes exceeds {MAX_DESCRIPTOR}"
            )),
            read_at,
        ));
    }
    // A private copy: the client may write its ring while we parse.
    sc.desc.resize(dlen, 0);
    s.region().copy_out(rec.offset + RECORD_HEADER as u64, &mut sc.desc).expect("validated record");
    let mut refs: Vec<TensorRef<'_>> = Vec::new();
    let (model, timeout_us, priority) =
        desc::decode_into(&sc.desc, rec.data_start(), rec.record_len as u64, &mut refs)
            .map_err(|e| (None, e, read_at))?;
    let Some(q) = sh.model(model) else {
        return Err((None, RequestError::new(Code::UnknownModel, unknown(sh, model)), read_at));
    };
    let fail = |e: RequestError| (Some(q.clone()), e, read_at);
    q.sig.order(&refs, &mut sc.order).map_err(fail)?;
    // A large identity request is copied by the identity worker (identity.rs), not here, and
    // a large tensor's values (a bytes length table of 11 M strings, bools) are checked by
    // whichever worker gathers it (batch.rs): one client's 64 MiB must not hold up every
    // other session's intake (issue 19.2).
    let aside = q.identity && refs.iter().map(|r| r.nbytes).sum::<u64>() >= identity::INLINE_MAX;
    let mut inputs = Vec::with_capacity(sc.order.len());
    for &i in &sc.order {
        let r = &refs[i];
        let off = rec.offset + r.offset;
        let checks = matches!(r.dtype, DType::Bytes | DType::Bool);
        let later = checks && (aside || r.nbytes >= identity::INLINE_MAX);
        if checks && !later {
            signature::check_values_in(s.region(), off, r.dtype, r.nbytes, r.shape.numel(), r.name)
                .expect("inside the validated record")
                .map_err(fail)?;
        }
        inputs.push(Input {
            offset: off,
            nbytes: r.nbytes,
            dtype: r.dtype,
            dims: r.shape.dims().to_vec(),
            unchecked: later.then(|| r.name.to_string()),
        });
    }
    if aside {
        // Refused before the worker copies anything: its response would not fit the ring.
        let x = &inputs[0];
        let need = plan_outputs(&[("y", x.dtype.name(), &x.dims, x.nbytes)]).record_len;
        if need > s.response_capacity() {
            return Err(fail(RequestError::new(Code::TooLarge, too_large(need, s))));
        }
    }
    if q.identity && !aside {
        let ok = identity(s, rec, &inputs[0], &mut sc.payload);
        sh.meters.request(
            &q.name,
            if ok { "ok" } else { "TOO_LARGE" },
            Some(read_at.elapsed()),
            None,
        );
        return Ok(None);
    }
    let rows = inputs.first().and_then(|i| i.dims.first().copied()).unwrap_or(1);
    let nbytes = inputs.iter().map(|i| i.nbytes).sum();
    let key = Job::key_of(&inputs);
    let priority = if priority > 0 && s.high_priority { 1 } else { 0 };
    let job = Job {
        session: s.clone(),
        position: rec.position,
        request_id: rec.request_id,
        read_at,
        queued_at: read_at,
        deadline: (timeout_us > 0).then(|| read_at + Duration::from_micros(timeout_us)),
        priority,
        inputs,
        rows,
        nbytes,
        key,
    };
    Ok(Some((q, job)))
}

/// The built-in identity, answered from the request record itself: its bytes copied out once
/// (the client may scribble over its ring: nothing here holds a reference into it), then into
/// the response. False: refused (its response cannot fit the response ring).
fn identity(s: &Arc<Session>, rec: &RecordInfo, x: &Input, buf: &mut Vec<u8>) -> bool {
    let plan = plan_outputs(&[("y", x.dtype.name(), &x.dims, x.nbytes)]);
    if plan.record_len > s.response_capacity() {
        let msg = too_large(plan.record_len, s);
        s.respond_error(rec.request_id, Code::TooLarge, &msg, Some(rec.position));
        return false;
    }
    buf.resize(x.nbytes as usize, 0);
    s.region().copy_out(x.offset, buf).expect("inside the validated record");
    let payloads = [(plan.offsets[0], &buf[..])];
    s.respond(
        &Response {
            request_id: rec.request_id,
            record_len: plan.record_len,
            desc: &plan.descriptor,
            payloads: &payloads,
        },
        Some(rec.position),
        true,
    );
    true
}

/// TOO_LARGE's message for outputs that need a `need`-byte response record.
fn too_large(need: u64, s: &Session) -> String {
    format!(
        "the outputs need a {need}-byte response record but this session's response ring holds \
         {} bytes: connect with a response ring of at least {} bytes (Go: WithRingSize)",
        s.response_capacity(),
        need.max(65536).next_power_of_two()
    )
}
