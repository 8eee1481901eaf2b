//! The serving core: everything the daemon does per request, in native threads, without the
//! GIL. Python is entered once per batch.
//!
//! ```text
//!  clients' rings ──▶ dispatch (one thread: epoll, intake, identity, errors;
//!                        │       identity from 1 MiB goes to its own worker: identity.rs)
//!                        │ jobs
//!                        ▼
//!                     queue (per model: priorities, round robin, OVERLOADED)
//!                        │ take() by a model's Python worker, GIL released
//!                        ▼
//!                     batch (gather into arenas, release records)
//!                        │ Python: one forward pass
//!                        ▼
//!                     batch.complete (split, one memcpy per output per request,
//!                                     one wake-up per session) ──▶ clients' rings
//! ```
//!
//! The control plane (Python) creates sessions' segments and eventfds and hands them over
//! ([`Engine::add_session`]); it learns of corrupt rings and freed sessions from [`Events`].

pub mod batch;
pub mod dispatch;
pub mod events;
pub mod identity;
pub mod meter;
pub mod queue;
pub mod session;

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

pub use events::{Event, Events};
use meter::Meters;
use queue::Queue;
use session::{Ledger, Session, EFD_REQ_DATA, EFD_RESP_SPACE};

use crate::error::Code;
use crate::wake;

pub struct Shared {
    ep: RawFd,
    wake: RawFd,
    sessions: RwLock<HashMap<u64, Arc<Session>>>,
    models: RwLock<HashMap<String, Arc<Queue>>>,
    pub events: Arc<Events>,
    pub ledger: Arc<Ledger>,
    pub meters: Arc<Meters>,
    spin: Duration,
    stopping: AtomicBool,
    /// The longest the dispatcher spent on one session's records in one pass (ns), since
    /// start: every other session's intake waited that long (a metric).
    pub longest_pass_ns: AtomicU64,
}

impl Shared {
    pub fn session(&self, id: u64) -> Option<Arc<Session>> {
        self.sessions.read().unwrap_or_else(|e| e.into_inner()).get(&id).cloned()
    }

    fn all_sessions(&self) -> Vec<Arc<Session>> {
        self.sessions.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    pub fn model(&self, name: &str) -> Option<Arc<Queue>> {
        self.models.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    fn model_names(&self) -> Vec<String> {
        self.models.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Safety: our own descriptors.
        unsafe {
            libc::close(self.ep);
            libc::close(self.wake);
        }
    }
}

pub struct Engine {
    pub shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn epoll_add(ep: RawFd, fd: RawFd, token: u64) -> std::io::Result<()> {
    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
    // Safety: valid descriptors and a live event.
    if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn epoll_del(ep: RawFd, fd: RawFd) {
    let mut ev = libc::epoll_event { events: 0, u64: 0 };
    // Safety: as above; an fd that is not registered is ignored.
    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, &mut ev) };
}

impl Engine {
    pub fn new(
        spin: Duration,
        max_memory: u64,
        max_memory_per_uid: u64,
    ) -> std::io::Result<Engine> {
        // Safety: new descriptors, owned by Shared.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            let e = std::io::Error::last_os_error();
            unsafe { libc::close(ep) };
            return Err(e);
        }
        epoll_add(ep, wake, dispatch::WAKE)?;
        let shared = Arc::new(Shared {
            ep,
            wake,
            sessions: RwLock::new(HashMap::new()),
            models: RwLock::new(HashMap::new()),
            events: Arc::new(Events::new()?),
            ledger: Arc::new(Ledger::new(max_memory, max_memory_per_uid)),
            meters: Arc::new(Meters::default()),
            spin,
            stopping: AtomicBool::new(false),
            longest_pass_ns: AtomicU64::new(0),
        });
        Ok(Engine { shared, thread: Mutex::new(None) })
    }

    pub fn start(&self) -> std::io::Result<()> {
        let sh = self.shared.clone();
        let t = std::thread::Builder::new()
            .name("dispatcher".into())
            .spawn(move || dispatch::run(sh))?;
        *self.thread.lock().unwrap() = Some(t);
        Ok(())
    }

    /// Whether the dispatcher thread runs (the systemd watchdog pings only while it does).
    pub fn alive(&self) -> bool {
        self.thread.lock().unwrap().as_ref().is_some_and(|t| !t.is_finished())
    }

    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        wake::post(self.shared.wake);
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
        for q in self.shared.models.read().unwrap().values() {
            q.retire();
        }
    }

    /// Serves a session. On error its eventfds are left to the caller (not closed here).
    pub fn add_session(&self, mut s: Session) -> std::io::Result<()> {
        let id = s.id;
        let r = epoll_add(self.shared.ep, s.efd(EFD_REQ_DATA), id << 1)
            .and_then(|_| epoll_add(self.shared.ep, s.efd(EFD_RESP_SPACE), (id << 1) | 1));
        if let Err(e) = r {
            epoll_del(self.shared.ep, s.efd(EFD_REQ_DATA));
            s.disown_efds();
            return Err(e);
        }
        self.shared.sessions.write().unwrap().insert(id, Arc::new(s));
        wake::post(self.shared.wake); // records may be there already: look once
        Ok(())
    }

    /// Stops serving a session: nothing more is read or written. Its memory and descriptors go
    /// once no job holds it (then an [`Event::Freed`] follows).
    pub fn end_session(&self, id: u64) {
        let s = self.shared.sessions.write().unwrap().remove(&id);
        if let Some(s) = s {
            // Deregistered while the descriptors are still open (an eventfd's other end lives
            // in the client: closing ours alone would not remove it from the epoll set).
            epoll_del(self.shared.ep, s.efd(EFD_REQ_DATA));
            epoll_del(self.shared.ep, s.efd(EFD_RESP_SPACE));
            s.stop();
        }
    }

    pub fn session(&self, id: u64) -> Option<Arc<Session>> {
        self.shared.session(id)
    }

    pub fn sessions(&self) -> usize {
        self.shared.sessions.read().unwrap().len()
    }

    /// Serves `q` under its name from now on; the version it replaces drains and ends.
    pub fn set_model(&self, q: Arc<Queue>) {
        let old = self.shared.models.write().unwrap().insert(q.name.clone(), q);
        if let Some(old) = old {
            old.retire();
        }
    }

    pub fn remove_model(&self, name: &str) {
        if let Some(old) = self.shared.models.write().unwrap().remove(name) {
            old.retire();
        }
    }

    pub fn model(&self, name: &str) -> Option<Arc<Queue>> {
        self.shared.model(name)
    }

    pub fn models(&self) -> Vec<Arc<Queue>> {
        self.shared.models.read().unwrap().values().cloned().collect()
    }

    /// Answers every queued request of every model with `code` (they never run).
    pub fn cancel_queued(&self, code: Code, message: &str) -> usize {
        let mut n = 0;
        for q in self.models() {
            for job in q.drain() {
                self.shared.meters.request(
                    &q.name,
                    code.name(),
                    Some(job.read_at.elapsed()),
                    Some(job.queued_at.elapsed()),
                );
                job.session.respond_error(job.request_id, code, message, Some(job.position));
                job.session.wake_client();
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::session::Session;

    pub(crate) use crate::TEST_FDS as FDS;

    pub(crate) fn eventfd() -> RawFd {
        unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) }
    }

    pub(crate) fn session(e: &Engine, id: u64) -> Session {
        let name = std::ffi::CString::new("t").unwrap();
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        assert_eq!(unsafe { libc::ftruncate(fd, 4096 + 2 * 65536) }, 0);
        let sh = &e.shared;
        let s = Session::new(
            id,
            "t".into(),
            fd,
            65536,
            65536,
            [eventfd(), eventfd(), eventfd(), eventfd()],
            0,
            false,
            1 << 20,
            sh.ledger.clone(),
            sh.events.clone(),
        )
        .unwrap();
        unsafe { libc::close(fd) };
        s
    }

    /// Issue 15 defect 7: an epoll event taken before a session ended names the session, not
    /// a descriptor; handling it after the session's descriptors were closed and their numbers
    /// reused must not read the new owner's bytes.
    #[test]
    fn a_stale_event_never_reads_a_reused_descriptor() {
        let _fds = FDS.lock().unwrap_or_else(|e| e.into_inner());
        let e = Engine::new(Duration::ZERO, 0, 0).unwrap();
        e.add_session(session(&e, 7)).unwrap();
        let rd = e.session(7).unwrap().efd(EFD_REQ_DATA);
        wake::post(rd); // the client publishes: epoll would report (7 << 1)
        e.end_session(7); // the control plane ends it; no job holds it: its fds close now
        assert!(unsafe { libc::fcntl(rd, libc::F_GETFD) } < 0, "the session's eventfd is closed");
        let mut fillers = vec![];
        let victim = loop {
            let f = eventfd(); // the next accept()s get the lowest free numbers
            if f >= rd {
                break f;
            }
            fillers.push(f);
        };
        assert_eq!(victim, rd, "the test reuses the number");
        wake::post(victim);
        let mut ready = vec![];
        dispatch::event(&e.shared, 7 << 1, &mut ready); // the stale event, handled late
        let mut v: u64 = 0;
        let n = unsafe { libc::read(victim, &mut v as *mut u64 as *mut libc::c_void, 8) };
        assert_eq!((n, v), (8, 1), "the stale event read the reused descriptor");
        assert!(ready.is_empty());
        for f in fillers.into_iter().chain([victim]) {
            unsafe { libc::close(f) };
        }
    }
}
