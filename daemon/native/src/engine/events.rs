//! What the serving core tells the control plane, which waits on `fd` in its own epoll: a
//! session whose client broke its ring (end it with this error), and a session whose memory
//! and descriptors are gone (its admission may be released, its pages punched).

use std::os::fd::RawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::Code;
use crate::wake;

pub enum Event {
    Fatal {
        session: u64,
        code: Code,
        message: String,
    },
    Freed {
        session: u64,
    },
    /// A request answered with an error at intake, for the log (rate-limited: `refused`).
    Refused {
        session: u64,
        code: Code,
        message: String,
    },
}

pub struct Events {
    queue: Mutex<Vec<Event>>,
    /// Refused-request events let through in the current window: (window start, count).
    refusals: Mutex<(Option<Instant>, u32)>,
    pub fd: RawFd,
}

/// At most this many refused requests per window reach the log (a flood of bad requests must
/// not become a flood of events or log lines).
const REFUSALS: u32 = 10;
const WINDOW: Duration = Duration::from_secs(10);

impl Events {
    pub fn new() -> std::io::Result<Events> {
        // Safety: a new eventfd; counter mode, non-blocking.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Events { queue: Mutex::new(Vec::new()), refusals: Mutex::new((None, 0)), fd })
    }

    pub fn push(&self, e: Event) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).push(e);
        wake::post(self.fd);
    }

    /// A refused request, if the window has room for one more.
    pub fn refused(&self, session: u64, code: Code, message: &str) {
        {
            let mut r = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if r.0.is_none_or(|t| now - t >= WINDOW) {
                *r = (Some(now), 0);
            }
            if r.1 >= REFUSALS {
                return;
            }
            r.1 += 1;
        }
        self.push(Event::Refused { session, code, message: message.to_string() });
    }

    pub fn take(&self) -> Vec<Event> {
        wake::drain(self.fd);
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        // Safety: our own descriptor.
        unsafe { libc::close(self.fd) };
    }
}
