"""Spin-then-block waiting with sleeper flags (SPEC §4.5).

The waiter advertises that it sleeps in a `*_waiting` word, so the other side only pays for a
`sem_post` when someone is actually asleep (io_uring's SQ_NEED_WAKEUP idea).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import posix_ipc

from .ring import RingControl

# Upper bound on one sleep (SPEC §4.5 allows 50 ms). Also bounds how long a stopped session's
# thread takes to notice it should exit.
SLEEP_SLICE = 0.010

# CPython exposes no memory fence. An uncontended lock acquire/release is a locked
# read-modify-write (sem_wait/sem_post in glibc), which is a full barrier on x86-64; that is the
# store->load ordering the sleeper-flag handshake needs.
_fence_lock = threading.Lock()


def full_fence() -> None:
    with _fence_lock:
        pass


class Waiter:
    """Waits on one semaphore, owning one `*_waiting` word of a ring control block."""

    def __init__(self, sem: posix_ipc.Semaphore, ctl: RingControl, flag: int, spin: float = 0.0):
        self.sem = sem
        self.ctl = ctl
        self.flag = flag
        self.spin = spin

    def wait(self, ready: Callable[[], bool], stop: Callable[[], bool],
             deadline: float | None = None) -> bool:
        """Return True once `ready()`; False when `stop()` or the monotonic `deadline` comes."""
        if ready():
            return True
        if self.spin > 0:
            end = time.monotonic() + self.spin
            while time.monotonic() < end:
                if ready():
                    return True
                # Let go of the GIL and of the core between polls: a spinning session must not
                # stall other sessions' threads for a switch interval (5 ms), and on a small
                # machine the peer it waits for may need this very core (time.sleep(0) does not
                # yield the CPU, sched_yield does).
                os.sched_yield()
        while True:
            self.ctl.set_flag(self.flag, 1)
            full_fence()
            if ready():
                self.ctl.set_flag(self.flag, 0)
                return True
            timeout = SLEEP_SLICE
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
            if timeout > 0:
                try:
                    self.sem.acquire(timeout)
                except posix_ipc.BusyError:
                    pass
            self.ctl.set_flag(self.flag, 0)
            if ready():
                return True
            if stop() or (deadline is not None and time.monotonic() >= deadline):
                return False


class Notifier:
    """Posts one semaphore when the other side's `*_waiting` word says it sleeps."""

    def __init__(self, sem: posix_ipc.Semaphore, ctl: RingControl, flag: int):
        self.sem = sem
        self.ctl = ctl
        self.flag = flag

    def notify(self) -> None:
        full_fence()
        if self.ctl.flag(self.flag):
            self.sem.release()
