"""Segments of ended sessions whose client still holds unreleased responses (issue 19.3).

When a session ends, the daemon punches out every page of its segment except the response
records the client has not released: the client may still be reading them (SPEC §2.5).
A client that never reads, and keeps the memfd, kept those pages alive uncounted (the
hostile run: +248 MiB of shmem per session, 1.5 GiB after six, with admission counting 0).
Now they stay counted against the client's uid (and the daemon's total) until they are
gone: the segment stays mapped here, and the control loop looks at it every CHECK_S:

* records the client released since (its head moved; the Go client releases views after
  the session too) are punched, and the charge shrinks;
* once nothing is left, or the client's process has exited (a pidfd says so; its mappings
  are gone then), everything is punched and the segment unmapped.

A client that keeps them forever keeps them counted: with max_memory_per_uid it then only
locks itself out. Everything here runs on the control loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from dataclasses import dataclass

from ..transport.segment import Segment
from .limits import Admission, Grant

log = logging.getLogger(__name__)

CHECK_S = 1.0


@dataclass
class _Held:
    seg: Segment
    grant: Grant
    pidfd: int  # -1: the process was gone already


class Lingering:
    def __init__(self, admission: Admission):
        self.admission = admission
        self._held: list[_Held] = []
        self._next = 0.0

    def __len__(self) -> int:
        return len(self._held)

    def add(self, seg: Segment, uid: int, pid: int, kept: int) -> None:
        """Count `kept` bytes of `seg` against `uid` until the client `pid` releases them or
        exits."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # ESRCH: it exited already (pidfd_open needs Linux 5.3: then too)
            pidfd = -1
        h = _Held(seg, self.admission.hold(uid, kept), pidfd)
        self._held.append(h)
        log.debug("segment of uid %d pid %d: %d bytes of unreleased responses kept", uid, pid,
                  kept)
        if pidfd < 0:
            self._free(h)
        elif len(self._held) == 1:
            self._next = time.monotonic() + CHECK_S

    def next_check(self) -> float | None:
        return self._next if self._held else None

    def check(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if not self._held or now < self._next:
            return
        self._next = now + CHECK_S
        for h in list(self._held):
            if _exited(h.pidfd):
                self._free(h)
                continue
            kept = h.seg.release_memory()
            if not kept:
                self._free(h)
            elif kept != h.grant.size:
                self.admission.resize(h.grant, kept)

    def close(self) -> None:
        """The daemon stops: nothing is counted any more."""
        for h in list(self._held):
            self._free(h)

    def _free(self, h: _Held) -> None:
        self._held.remove(h)
        h.seg.close()  # punches the rest and unmaps
        self.admission.release(h.grant)
        if h.pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(h.pidfd)


def _exited(pidfd: int) -> bool:
    """A pidfd is readable once its process has exited."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))
