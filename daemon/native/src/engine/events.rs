//! What the serving core tells the control plane, which waits on `fd` in its own epoll: a
//! session whose client broke its ring (end it with this error), and a session whose memory
//! and descriptors are gone (its admission may be released, its pages punched).

use std::os::fd::RawFd;
use std::sync::Mutex;

use crate::error::Code;
use crate::wake;

pub enum Event {
    Fatal { session: u64, code: Code, message: String },
    Freed { session: u64 },
}

pub struct Events {
    queue: Mutex<Vec<Event>>,
    pub fd: RawFd,
}

impl Events {
    pub fn new() -> std::io::Result<Events> {
        // Safety: a new eventfd; counter mode, non-blocking.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Events { queue: Mutex::new(Vec::new()), fd })
    }

    pub fn push(&self, e: Event) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).push(e);
        wake::post(self.fd);
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
