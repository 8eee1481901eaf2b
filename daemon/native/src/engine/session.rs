//! One client's session as the serving core sees it: its own mapping of the segment, its four
//! eventfds, the request ring it consumes and the response ring it produces, and the responses
//! it parks while its client does not read.
//!
//! Every response goes through [`Session::respond`]: written into the ring when it fits, else
//! kept as an owned copy (parked) until the client frees space, counted against the session's
//! `park_limit` and the [`Ledger`] (the uid's and the daemon's memory). A response that cannot
//! be held is answered TOO_LARGE instead (the model ran). The session's memory and descriptors
//! go when the last `Arc` goes: jobs in queues and batches hold one, so nothing they read or
//! write is unmapped or closed under them, and a descriptor number is never reused while this
//! core may still read it.

use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::events::{Event, Events};
use crate::desc::{self, ErrorFields};
use crate::error::Code;
use crate::layout::{
    align64, RecordHeader, CTL_CONSUMER_WAITING, CTL_PRODUCER_WAITING, KIND_REQUEST, KIND_RESPONSE,
    RECORD_HEADER,
};
use crate::region::Region;
use crate::ring::{Consumer, Corrupt, Geometry, Producer, RecordInfo};
use crate::wake;

/// SPEC §4.1: the segment header is 4096 bytes; the request ring's control block at 128, the
/// response ring's at 256; the rings follow the header.
const HEADER_SIZE: u64 = 4096;
const REQ_CTL: u64 = 128;
const RESP_CTL: u64 = 256;
/// Indexes of the welcome's eventfds (SPEC §2.4): rd, rs, pd, ps.
pub const EFD_REQ_DATA: usize = 0;
pub const EFD_REQ_SPACE: usize = 1;
pub const EFD_RESP_DATA: usize = 2;
pub const EFD_RESP_SPACE: usize = 3;
/// Past this many parked responses (however small) the dispatcher takes no more requests.
const MAX_PARKED: usize = 4096;
/// Error messages are cut here (as the Python path did).
const MAX_ERROR_MESSAGE: usize = 4000;

/// Parked response bytes per uid and in all, against the daemon's memory limits (0: none).
/// Ring bytes are counted by the control plane's admission; it tells us each session's size so
/// that ring and parked bytes are held to one budget.
pub struct Ledger {
    inner: Mutex<LedgerInner>,
}

#[derive(Default)]
struct LedgerInner {
    max_memory: u64,
    max_memory_per_uid: u64,
    rings: u64,
    parked: u64,
    by_uid: HashMap<u32, (u64, u64)>, // uid -> (ring bytes, parked bytes)
}

fn mib(n: u64) -> String {
    if n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    }
}

impl Ledger {
    pub fn new(max_memory: u64, max_memory_per_uid: u64) -> Ledger {
        Ledger {
            inner: Mutex::new(LedgerInner { max_memory, max_memory_per_uid, ..Default::default() }),
        }
    }

    pub fn add_rings(&self, uid: u32, n: u64) {
        let mut l = self.inner.lock().unwrap();
        l.rings += n;
        l.by_uid.entry(uid).or_default().0 += n;
    }

    pub fn remove_rings(&self, uid: u32, n: u64) {
        let mut l = self.inner.lock().unwrap();
        l.rings -= n;
        let e = l.by_uid.entry(uid).or_default();
        e.0 -= n;
        if *e == (0, 0) {
            l.by_uid.remove(&uid);
        }
    }

    /// Counts `n` parked bytes for `uid`, or says which limit they would pass.
    pub fn take(&self, uid: u32, n: u64) -> Result<(), String> {
        let mut l = self.inner.lock().unwrap();
        let (r, p) = l.by_uid.get(&uid).copied().unwrap_or((0, 0));
        if l.max_memory != 0 && l.rings + l.parked + n > l.max_memory {
            return Err(format!(
                "sessions and their unread responses hold {} of the daemon's max_memory={}",
                mib(l.rings + l.parked),
                mib(l.max_memory)
            ));
        }
        if l.max_memory_per_uid != 0 && r + p + n > l.max_memory_per_uid {
            return Err(format!(
                "uid {uid}'s sessions and unread responses hold {} of max_memory_per_uid={}",
                mib(r + p),
                mib(l.max_memory_per_uid)
            ));
        }
        l.parked += n;
        l.by_uid.entry(uid).or_default().1 += n;
        Ok(())
    }

    pub fn give(&self, uid: u32, n: u64) {
        let mut l = self.inner.lock().unwrap();
        l.parked -= n;
        let e = l.by_uid.entry(uid).or_default();
        e.1 -= n;
        if *e == (0, 0) {
            l.by_uid.remove(&uid);
        }
    }

    /// (parked bytes of `uid`, parked bytes in all).
    pub fn parked(&self, uid: u32) -> (u64, u64) {
        let l = self.inner.lock().unwrap();
        (l.by_uid.get(&uid).map_or(0, |e| e.1), l.parked)
    }
}

/// The core's own mapping of a session's memfd (unmapped when the session goes).
struct Mapping {
    base: *mut u8,
    len: usize,
}

unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Safety: our own mapping, unmapped once.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

struct Parked {
    bytes: Vec<u8>,
    charged: u64,
}

struct Inner {
    req: Consumer,
    resp: Producer,
    parked: VecDeque<Parked>,
    parked_bytes: u64,
}

/// A response to write: its descriptor and payloads at their offsets from the record start.
pub struct Response<'a> {
    pub request_id: u64,
    pub record_len: u64,
    pub desc: &'a [u8],
    pub payloads: &'a [(u64, &'a [u8])],
}

pub struct Session {
    pub id: u64,
    /// The first 8 hex digits of the session id, for logs.
    pub name: String,
    pub uid: u32,
    /// Its requests may ask for high priority (uid in priority_uids).
    pub high_priority: bool,
    pub park_limit: u64,
    pub segment_size: u64,
    region: Region,
    efds: [RawFd; 4],
    inner: Mutex<Inner>,
    /// Ended: nothing more is read or written (set once, under `inner`).
    stopped: AtomicBool,
    /// Records taken and not answered yet (drain waits for 0).
    running: AtomicU64,
    pub served: AtomicU64,
    /// The session's protocol version is 5 or later: error responses carry their fields.
    pub error_fields: AtomicBool,
    ledger: Arc<Ledger>,
    events: Arc<Events>,
    _map: Mapping,
}

impl Session {
    /// Maps `memfd` (the segment of `req_cap` + `resp_cap` ring bytes the control plane created
    /// and initialised) and takes ownership of the four eventfds (closed when the session goes).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        name: String,
        memfd: RawFd,
        req_cap: u64,
        resp_cap: u64,
        efds: [RawFd; 4],
        uid: u32,
        high_priority: bool,
        park_limit: u64,
        ledger: Arc<Ledger>,
        events: Arc<Events>,
    ) -> std::io::Result<Session> {
        let size = HEADER_SIZE + req_cap + resp_cap;
        // Safety: a fresh shared mapping of the caller's memfd, owned by Mapping.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let map = Mapping { base: base as *mut u8, len: size as usize };
        let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        // Safety: the mapping lives in `_map`, as long as the session.
        let region = unsafe { Region::new(map.base, map.len) }.ok_or_else(|| bad("mmap".into()))?;
        let req =
            Geometry::new(region, REQ_CTL, HEADER_SIZE, req_cap).map_err(|e| bad(e.to_string()))?;
        let resp = Geometry::new(region, RESP_CTL, HEADER_SIZE + req_cap, resp_cap)
            .map_err(|e| bad(e.to_string()))?;
        ledger.add_rings(uid, size);
        let s = Session {
            id,
            name,
            uid,
            high_priority,
            park_limit,
            segment_size: size,
            region,
            efds,
            inner: Mutex::new(Inner {
                req: Consumer::new(req, KIND_REQUEST),
                resp: Producer::new(resp),
                parked: VecDeque::new(),
                parked_bytes: 0,
            }),
            stopped: AtomicBool::new(false),
            running: AtomicU64::new(0),
            served: AtomicU64::new(0),
            error_fields: AtomicBool::new(true),
            ledger,
            events,
            _map: map,
        };
        // The dispatcher waits on every session in one epoll call: clients post `rd` after
        // every publish (SPEC §4.5); cleared only while the dispatcher spins.
        s.flag(REQ_CTL + CTL_CONSUMER_WAITING).store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        Ok(s)
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    pub fn response_capacity(&self) -> u64 {
        self.lock().resp.capacity()
    }

    /// The request ring position read up to (what a spinning dispatcher waits to move).
    pub fn consumer_read(&self) -> u64 {
        self.lock().req.read()
    }

    pub fn efd(&self, i: usize) -> RawFd {
        self.efds[i]
    }

    /// The caller keeps the eventfds: they are not closed when this session goes.
    pub fn disown_efds(&mut self) {
        self.efds = [-1; 4];
    }

    fn flag(&self, off: u64) -> &AtomicU32 {
        self.region.atomic_u32(off).expect("control block inside the header")
    }

    pub fn tail_word(&self) -> &AtomicU64 {
        self.region.atomic_u64(REQ_CTL).expect("control block inside the header")
    }

    /// Whether the dispatcher asks the client to post `rd` after each publish.
    pub fn want_posts(&self, on: bool) {
        self.flag(REQ_CTL + CTL_CONSUMER_WAITING).store(on as u32, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Up to `limit` new request records (PADs count), or the ring is corrupt. Nothing while
    /// stopped or while too much is parked (flow control: the client then waits for
    /// request-ring space, as with a slow server).
    pub fn take(&self, limit: usize, out: &mut Vec<RecordInfo>) -> Result<(), Corrupt> {
        out.clear();
        let mut g = self.lock();
        if self.is_stopped() || Self::parked_full(&g, self.park_limit) {
            return Ok(());
        }
        let r = g.req.poll(limit, out);
        self.running.fetch_add(out.len() as u64, Ordering::AcqRel);
        r
    }

    fn parked_full(g: &Inner, limit: u64) -> bool {
        g.parked.len() >= MAX_PARKED || g.parked_bytes >= limit
    }

    /// Whether records wait that a pass would take.
    pub fn pending(&self) -> bool {
        let g = self.lock();
        !self.is_stopped() && !Self::parked_full(&g, self.park_limit) && g.req.published()
    }

    /// Nothing of this session is unread, queued, running or parked.
    pub fn idle(&self) -> bool {
        let g = self.lock();
        self.is_stopped()
            || (self.running.load(Ordering::Acquire) == 0
                && g.parked.is_empty()
                && !g.req.published())
    }

    /// Releases a request record (its bytes are no longer needed: gathered, or answered).
    pub fn release(&self, position: u64) {
        let mut g = self.lock();
        if self.is_stopped() {
            return;
        }
        if let Ok(true) = g.req.release(position) {
            wake::notify(self.flag(REQ_CTL + CTL_PRODUCER_WAITING), self.efds[EFD_REQ_SPACE]);
        }
    }

    /// Answers a taken request (write, else park). `release`: the request record to release
    /// with it (None when it was released at gather). Returns whether the client should be
    /// woken (call [`Session::wake_client`] once per batch, not per response).
    pub fn respond(&self, r: &Response<'_>, release: Option<u64>, ok: bool) -> bool {
        let mut g = self.lock();
        self.running.fetch_sub(1, Ordering::AcqRel);
        if self.is_stopped() {
            return false;
        }
        let mut wrote = false;
        if g.parked.is_empty() {
            if let Ok(Some(off)) = g.resp.reserve(r.record_len) {
                self.fill(off, r);
                g.resp.publish();
                wrote = true;
            }
        }
        if !wrote {
            self.park(&mut g, r);
        }
        if let Some(pos) = release {
            if let Ok(true) = g.req.release(pos) {
                wake::notify(self.flag(REQ_CTL + CTL_PRODUCER_WAITING), self.efds[EFD_REQ_SPACE]);
            }
        }
        if ok {
            self.served.fetch_add(1, Ordering::Relaxed);
        }
        wrote
    }

    /// Answers a taken request with an error.
    pub fn respond_error(&self, rid: u64, code: Code, message: &str, release: Option<u64>) -> bool {
        self.respond_error_fields(rid, code, message, &ErrorFields::default(), release)
    }

    /// Answers a taken request with an error that says what it is about: the fields go to
    /// protocol 5 sessions only (a protocol 4 client gets the error without them).
    pub fn respond_error_fields(
        &self,
        rid: u64,
        code: Code,
        message: &str,
        f: &ErrorFields<'_>,
        release: Option<u64>,
    ) -> bool {
        let none = ErrorFields::default();
        let f = if self.error_fields.load(Ordering::Relaxed) { f } else { &none };
        let desc = error_descriptor_fields(code, message, f);
        let len = align64(RECORD_HEADER as u64 + desc.len() as u64);
        self.respond(
            &Response { request_id: rid, record_len: len, desc: &desc, payloads: &[] },
            release,
            false,
        )
    }

    /// Posts `pd` if the client sleeps on it (one post for everything published before).
    pub fn wake_client(&self) {
        wake::notify(self.flag(RESP_CTL + CTL_CONSUMER_WAITING), self.efds[EFD_RESP_DATA]);
    }

    fn fill(&self, off: u64, r: &Response<'_>) {
        let h = RecordHeader {
            record_len: r.record_len as u32,
            kind: KIND_RESPONSE,
            request_id: r.request_id,
            desc_len: r.desc.len() as u32,
        };
        let reg = &self.region;
        reg.copy_in(off, &h.bytes()).expect("reserved inside the ring");
        reg.copy_in(off + RECORD_HEADER as u64, r.desc).expect("reserved inside the ring");
        for &(rel, bytes) in r.payloads {
            reg.copy_in(off + rel, bytes).expect("reserved inside the ring");
        }
    }

    /// Keeps a response as an owned copy (under the lock), or a TOO_LARGE in its place when
    /// the session's or the daemon's budget would be passed.
    fn park(&self, g: &mut Inner, r: &Response<'_>) {
        let mut charged = 0;
        if !r.payloads.is_empty() {
            let why = if g.parked_bytes + r.record_len > self.park_limit {
                Some(format!(
                    "this session already holds {} bytes of responses its client has not read, \
                     of at most {} (max_parked_per_session in the daemon's config)",
                    g.parked_bytes, self.park_limit
                ))
            } else {
                match self.ledger.take(self.uid, r.record_len) {
                    Ok(()) => {
                        charged = r.record_len;
                        None
                    }
                    Err(e) => Some(e),
                }
            };
            if let Some(why) = why {
                let msg = format!(
                    "the {}-byte response to request {} does not fit the response ring now and \
                     cannot be held: {why}. The model ran. Read and release responses before \
                     sending more, or connect with a larger response ring",
                    r.record_len, r.request_id
                );
                let desc = error_descriptor(Code::TooLarge, &msg);
                let len = align64(RECORD_HEADER as u64 + desc.len() as u64);
                let e = Response {
                    request_id: r.request_id,
                    record_len: len,
                    desc: &desc,
                    payloads: &[],
                };
                return self.park(g, &e);
            }
        }
        let mut bytes = vec![0u8; r.record_len as usize];
        let h = RecordHeader {
            record_len: r.record_len as u32,
            kind: KIND_RESPONSE,
            request_id: r.request_id,
            desc_len: r.desc.len() as u32,
        };
        bytes[..RECORD_HEADER].copy_from_slice(&h.bytes());
        bytes[RECORD_HEADER..RECORD_HEADER + r.desc.len()].copy_from_slice(r.desc);
        for &(rel, b) in r.payloads {
            bytes[rel as usize..rel as usize + b.len()].copy_from_slice(b);
        }
        g.parked_bytes += r.record_len;
        g.parked.push_back(Parked { bytes, charged });
        self.want_space(g);
    }

    /// Asks for a post of `ps` when the client frees space (SPEC §4.5); a release that came
    /// before the flag was set is caught by the re-check, which posts our own `ps`.
    fn want_space(&self, g: &Inner) {
        self.flag(RESP_CTL + CTL_PRODUCER_WAITING).store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if let Some(p) = g.parked.front() {
            if g.resp.fits(p.bytes.len() as u64).unwrap_or(false) {
                wake::post(self.efds[EFD_RESP_SPACE]);
            }
        }
    }

    /// Writes parked responses that fit now (the client freed response-ring space).
    pub fn flush(&self) {
        let mut g = self.lock();
        if self.is_stopped() {
            return;
        }
        let mut wrote = false;
        let g = &mut *g;
        while let Some(n) = g.parked.front().map(|p| p.bytes.len() as u64) {
            match g.resp.reserve(n) {
                Ok(Some(off)) => {
                    let bytes = &g.parked.front().expect("front exists").bytes;
                    self.region.copy_in(off, bytes).expect("reserved inside the ring");
                    g.resp.publish();
                    wrote = true;
                    let p = g.parked.pop_front().expect("front exists");
                    g.parked_bytes -= n;
                    if p.charged != 0 {
                        self.ledger.give(self.uid, p.charged);
                    }
                }
                _ => break,
            }
        }
        if wrote {
            self.wake_client();
        }
        if g.parked.is_empty() {
            self.flag(RESP_CTL + CTL_PRODUCER_WAITING).store(0, Ordering::Relaxed);
        } else {
            self.want_space(g);
        }
    }

    /// Stops reading and writing; parked responses are dropped (their budget given back).
    pub fn stop(&self) {
        let mut g = self.lock();
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        let charged: u64 = g.parked.iter().map(|p| p.charged).sum();
        g.parked.clear();
        g.parked_bytes = 0;
        if charged != 0 {
            self.ledger.give(self.uid, charged);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for &fd in self.efds.iter().filter(|&&fd| fd >= 0) {
            // Safety: our own descriptors, closed once, after every user of them is gone.
            unsafe { libc::close(fd) };
        }
        self.ledger.remove_rings(self.uid, self.segment_size);
        self.events.push(Event::Freed { session: self.id });
    }
}

/// An error response's descriptor (SPEC §4.4), the message cut to MAX_ERROR_MESSAGE.
pub fn error_descriptor(code: Code, message: &str) -> Vec<u8> {
    error_descriptor_fields(code, message, &ErrorFields::default())
}

/// error_descriptor with what the error is about (protocol 5).
pub fn error_descriptor_fields(code: Code, message: &str, f: &ErrorFields<'_>) -> Vec<u8> {
    let mut m = message;
    if m.len() > MAX_ERROR_MESSAGE {
        let mut end = MAX_ERROR_MESSAGE;
        while !m.is_char_boundary(end) {
            end -= 1;
        }
        m = &m[..end];
    }
    let mut out = Vec::with_capacity(m.len() + 48 + f.input.map_or(0, str::len));
    desc::encode_response_error_fields(&mut out, code as u32, code.name(), m, f);
    out
}
