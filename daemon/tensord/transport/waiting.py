"""Spin-then-block waiting with sleeper flags over eventfds (SPEC §4.5).

The waiter advertises that it sleeps in a `*_waiting` word, so the other side only pays for a
post when someone is actually asleep (io_uring's SQ_NEED_WAKEUP idea). The spin, the flag, the
full barrier and the blocking poll(2) all run in the native core without the GIL.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .ring import Shm

# Longest single block: bounds how long a waiter takes to notice `stop()` or its deadline.
SLEEP_SLICE = 0.050


class Waiter:
    """Waits for one counter to move, owning one `*_waiting` word and one eventfd."""

    def __init__(self, shm: Shm, counter_at: int, flag_at: int, efd: int, spin: float = 0.0):
        self.shm = shm
        self.counter_at = counter_at
        self.flag_at = flag_at
        self.efd = efd
        self.spin_ns = int(spin * 1e9)

    def wait(self, ready: Callable[[], bool], seen: Callable[[], int],
             stop: Callable[[], bool], deadline: float | None = None) -> bool:
        """Return True once `ready()`; False when `stop()` or the monotonic `deadline` comes.
        `seen()` is the counter value the caller has acted on: a wait ends when it moves."""
        spin = self.spin_ns
        while True:
            # The value first, then the check: a move in between then ends the wait at once.
            s = seen()
            if ready():
                return True
            if stop():
                return False
            slice_ns = int(SLEEP_SLICE * 1e9)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                slice_ns = min(slice_ns, int(left * 1e9))
            self.shm.wait(self.counter_at, s, self.flag_at, self.efd, spin, slice_ns)
            spin = 0  # spin once per wait, not once per slice


class Notifier:
    """Posts one eventfd when the other side's `*_waiting` word says it sleeps."""

    def __init__(self, shm: Shm, flag_at: int, efd: int):
        self.shm = shm
        self.flag_at = flag_at
        self.efd = efd

    def notify(self) -> bool:
        return self.shm.notify(self.flag_at, self.efd)
