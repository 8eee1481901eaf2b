//! Eventfd wake-ups and the waiting protocol of SPEC §4.5.
//!
//! A waiter advertises that it sleeps in a `*_waiting` word; a poster, after publishing or
//! releasing, issues a full barrier and posts only when that word is 1. The barrier on both
//! sides orders a store before a later load (Dekker), so no wake-up is lost.

use std::os::fd::RawFd;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Longest single block of [`wait`]: a waiter re-checks its counter at least this often.
const MAX_BLOCK: Duration = Duration::from_millis(50);

/// Posts an eventfd (adds 1). EAGAIN means the counter is saturated, so the waiter has posts
/// pending already; EBADF after a close races with teardown. Both are harmless: a wake-up is
/// only a hint, so every error is ignored.
pub fn post(efd: RawFd) {
    let one: u64 = 1;
    loop {
        // Safety: writes 8 bytes from a live local.
        let r = unsafe { libc::write(efd, &one as *const u64 as *const libc::c_void, 8) };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return;
    }
}

/// Takes every pending post of a non-blocking eventfd (counter mode); nothing pending is fine.
pub fn drain(efd: RawFd) {
    let mut v: u64 = 0;
    loop {
        // Safety: reads 8 bytes into a live local.
        let r = unsafe { libc::read(efd, &mut v as *mut u64 as *mut libc::c_void, 8) };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return;
    }
}

/// The poster's side: a full barrier, then post `efd` if the other side's `flag` says it
/// sleeps. Returns whether it posted.
pub fn notify(flag: &AtomicU32, efd: RawFd) -> bool {
    fence(Ordering::SeqCst);
    if flag.load(Ordering::Relaxed) != 0 {
        post(efd);
        return true;
    }
    false
}

/// Whether `flag` says the other side sleeps (after a full barrier), without posting: for a
/// caller that posts later, outside a lock.
pub fn wants_post(flag: &AtomicU32) -> bool {
    fence(Ordering::SeqCst);
    flag.load(Ordering::Relaxed) != 0
}

/// Waits (`poll(2)` with a timeout in ms) until `efd` is readable; true when it is.
fn poll_readable(efd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd { fd: efd, events: libc::POLLIN, revents: 0 };
    // Safety: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// The waiter's side: returns true once `counter` differs from `seen`, false when `timeout`
/// (None: never) passes first. Spins (yielding the CPU between checks, since the peer may need
/// this very core) for up to `spin`, then sets `flag`, fences, re-checks and blocks on `efd`
/// in slices of at most 50 ms, clearing `flag` after each. Blocks the calling thread: callers
/// holding a lock others need (the GIL) release it first.
pub fn wait(
    counter: &AtomicU64,
    seen: u64,
    flag: &AtomicU32,
    efd: RawFd,
    spin: Duration,
    timeout: Option<Duration>,
) -> bool {
    let start = Instant::now();
    let end = timeout.map(|t| start.checked_add(t).unwrap_or(start + Duration::from_secs(1 << 40)));
    let moved = || counter.load(Ordering::Acquire) != seen;
    let mut done = moved();
    while !done {
        let now = Instant::now();
        if now - start >= spin || end.is_some_and(|e| now >= e) {
            break;
        }
        std::thread::yield_now();
        done = moved();
    }
    while !done {
        flag.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        done = moved();
        if done {
            break;
        }
        let left = match end {
            Some(e) => {
                let now = Instant::now();
                if now >= e {
                    break;
                }
                e - now
            }
            None => MAX_BLOCK,
        };
        let ms = if left > MAX_BLOCK { 50 } else { left.as_nanos().div_ceil(1_000_000) as i32 };
        if poll_readable(efd, ms) {
            drain(efd);
        }
        flag.store(0, Ordering::Relaxed);
        done = moved();
    }
    flag.store(0, Ordering::Relaxed);
    done
}

/// Spins over several rings' `tail` words for up to `spin`, without blocking: the index of the
/// first whose tail differs from the position its consumer has read, or None.
pub fn spin_any(tails: &[(&AtomicU64, u64)], spin: Duration) -> Option<usize> {
    if tails.is_empty() {
        return None;
    }
    let end = Instant::now() + spin;
    let mut k: u32 = 0;
    loop {
        for (i, (t, read)) in tails.iter().enumerate() {
            if t.load(Ordering::Acquire) != *read {
                return Some(i);
            }
        }
        if k & 15 == 15 {
            if Instant::now() >= end {
                return None;
            }
            std::thread::yield_now();
        }
        k = k.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn eventfd() -> RawFd {
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        fd
    }

    fn count(efd: RawFd) -> u64 {
        let mut v = 0u64;
        let r = unsafe { libc::read(efd, &mut v as *mut u64 as *mut libc::c_void, 8) };
        if r == 8 {
            v
        } else {
            0
        }
    }

    #[test]
    fn notify_posts_only_for_a_sleeper() {
        let _fds = crate::TEST_FDS.lock().unwrap_or_else(|e| e.into_inner());
        let efd = eventfd();
        let flag = AtomicU32::new(0);
        assert!(!notify(&flag, efd));
        assert_eq!(count(efd), 0);
        flag.store(1, Ordering::Relaxed);
        assert!(notify(&flag, efd));
        assert!(notify(&flag, efd));
        assert_eq!(count(efd), 2, "counter mode: one read takes every post");
        drain(efd); // nothing pending: returns at once
        unsafe { libc::close(efd) };
        post(efd); // a closed fd is ignored, not a crash
    }

    #[test]
    fn wait_times_out_then_wakes_on_a_post() {
        let _fds = crate::TEST_FDS.lock().unwrap_or_else(|e| e.into_inner());
        let efd = eventfd();
        let counter = Arc::new(AtomicU64::new(5));
        let flag = Arc::new(AtomicU32::new(0));
        let t0 = Instant::now();
        assert!(!wait(&counter, 5, &flag, efd, Duration::ZERO, Some(Duration::from_millis(2))));
        assert!(t0.elapsed() >= Duration::from_millis(2));
        assert_eq!(flag.load(Ordering::Relaxed), 0, "the flag is cleared on return");
        assert!(
            wait(&counter, 4, &flag, efd, Duration::ZERO, Some(Duration::ZERO)),
            "moved already"
        );

        let (c2, f2) = (counter.clone(), flag.clone());
        let poster = std::thread::spawn(move || {
            while f2.load(Ordering::Relaxed) == 0 {
                std::thread::yield_now();
            }
            c2.store(6, Ordering::Release);
            assert!(notify(&f2, efd));
        });
        assert!(wait(&counter, 5, &flag, efd, Duration::from_micros(10), None));
        poster.join().unwrap();
        unsafe { libc::close(efd) };
    }

    #[test]
    fn spin_any_finds_the_moved_ring() {
        let _fds = crate::TEST_FDS.lock().unwrap_or_else(|e| e.into_inner());
        let a = AtomicU64::new(64);
        let b = AtomicU64::new(128);
        assert_eq!(spin_any(&[(&a, 64), (&b, 128)], Duration::from_micros(50)), None);
        assert_eq!(spin_any(&[(&a, 64), (&b, 64)], Duration::ZERO), Some(1));
        assert_eq!(spin_any(&[], Duration::from_secs(5)), None);
    }
}
