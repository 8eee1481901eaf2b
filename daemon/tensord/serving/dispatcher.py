"""The dispatcher: one thread waits on every session at once and hands their requests on.

It sleeps in one epoll call (the GIL released) on each session's request-data and
response-space eventfds (SPEC §4.5); when woken it drains every ready session's ring in a
round-robin pass, at most MAX_PER_PASS records per session per pass, so no session can make
another wait for more than one bounded slice of work, and hands each request to its
model's queue (scheduler.py), or runs it inline when the model does no tensor math. An idle
session costs nothing: no thread, no timer, no wake-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading

from ..contract.errors import InternalError, TensordError
from ..transport import _ring
from ..transport.segment import EFD_REQ_DATA, EFD_RESP_SPACE
from .scheduler import Scheduler
from .session import SPIN_GUARD, Session

log = logging.getLogger(__name__)

# Records taken from one session per pass: bounds the work one client causes before the
# others get their turn (PADs count too: the native core counts every record it walks).
MAX_PER_PASS = 16


class Dispatcher:
    def __init__(self, scheduler: Scheduler, spin_us: int = 0):
        self.scheduler = scheduler
        self.spin = spin_us / 1e6
        self._ep = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._ep.register(self._wake, select.EPOLLIN)
        self._lock = threading.Lock()
        self._by_fd: dict[int, tuple[Session, bool]] = {}  # eventfd -> (session, is requests)
        self._sessions: dict[Session, None] = {}
        # Forgotten sessions whose eventfds this thread closes once they have ended (_retire).
        self._retiring: list[Session] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, session: Session) -> None:
        rd, ps = session.seg.efds[EFD_REQ_DATA], session.seg.efds[EFD_RESP_SPACE]
        session.seg.own_efds = False  # closed by this dispatcher (_retire), not by the segment
        with self._lock:
            self._by_fd[rd] = (session, True)
            self._by_fd[ps] = (session, False)
            self._sessions[session] = None
            self._ep.register(rd, select.EPOLLIN)
            self._ep.register(ps, select.EPOLLIN)
        os.eventfd_write(self._wake, 1)  # records may be there already: look once

    def remove(self, session: Session) -> None:
        """Forget a session. Its eventfds stay open until the dispatcher thread closes them
        itself, between two passes and after the session has ended (_retire): an event it
        took from epoll before this call may still name them, and a closed descriptor's
        number can be reused at once by the next accept(), so reading a stale one would eat
        another connection's bytes. A pass already under way skips the session (Session.take
        checks `stopped` under the session's lock)."""
        with self._lock:
            if session in self._sessions:
                del self._sessions[session]
                for fd in session.seg.efds[EFD_REQ_DATA], session.seg.efds[EFD_RESP_SPACE]:
                    self._by_fd.pop(fd, None)
                    with contextlib.suppress(OSError):
                        self._ep.unregister(fd)
                self._retiring.append(session)
        os.eventfd_write(self._wake, 1)  # to _retire once it has ended

    def alive(self) -> bool:
        """Whether the dispatcher thread runs (the systemd watchdog pings only while it does)."""
        return self._thread.is_alive()

    def sessions(self) -> int:
        return len(self._sessions)

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        if self._thread.is_alive():
            self._thread.join()
        self._retire(every=True)
        self._ep.close()
        os.close(self._wake)

    def _retire(self, every: bool = False) -> None:
        """Close the eventfds of forgotten sessions that have ended (no thread posts to them
        any more). Only the dispatcher thread calls this, at the top of a pass, when it holds
        no event from an earlier epoll call (or after it stopped: every)."""
        with self._lock:
            done = [s for s in self._retiring if every or s.stopped]
            self._retiring = [s for s in self._retiring if not (every or s.stopped)]
        for s in done:
            s.seg.close_efds()

    # -- the loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        ready: dict[Session, None] = {}  # an ordered set: round-robin in arrival order
        while not self._stopping:
            if self._retiring:
                self._retire()
            if not ready and self.spin > 0:
                self._spin(ready)
                if not ready:
                    self._ask_for_posts(ready)
            try:
                events = self._ep.poll(0 if ready else -1)
            except InterruptedError:
                continue
            if self.spin > 0 and events:
                self._ask_for_posts(None)  # awake, and spinning again before sleeping
            for fd, _ in events:
                if fd == self._wake:
                    _drain(fd)
                    continue
                # Looked up before it is read: a session forgotten since epoll returned is
                # skipped (its descriptors are still open: only _retire closes them).
                with self._lock:
                    entry = self._by_fd.get(fd)
                if entry is None:
                    continue
                _drain(fd)
                session, is_requests = entry
                if not is_requests:
                    session.flush()  # the client freed response space
                ready[session] = None
            inline: dict = {}  # ModelQueue -> jobs this pass, for fast models
            for session in list(ready):
                if not self._serve(session, inline):
                    del ready[session]
            for q, jobs in inline.items():
                q.run_inline(jobs)

    def _ask_for_posts(self, ready: dict[Session, None] | None) -> None:
        """With a spin budget, clients post `rd` only while the dispatcher sleeps (SPEC
        §4.5): set every session's consumer_waiting before sleeping (each store is followed
        by a full barrier) and re-check its ring; clear them once awake (ready is None)."""
        with self._lock:
            sessions = list(self._sessions)
        for s in sessions:
            s.want_posts(ready is not None)
            if ready is not None and s.pending():
                ready[s] = None
        if ready:
            for s in sessions:
                s.want_posts(False)

    def _serve(self, session: Session, inline: dict) -> bool:
        """One bounded slice of a session's requests; True when it has more waiting. Jobs of
        fast, idle models collect in `inline` to run (batched) at the end of the pass."""
        try:
            for job in session.take(MAX_PER_PASS):
                if job.model.inline:
                    session.execute(job)  # no tensor math: a hand-off would cost more
                    continue
                try:
                    q = self.scheduler.queue(job.model)
                except TensordError as e:  # no worker thread could start: this request only
                    session.finish(job.record, error=e)
                    continue
                if q in inline or q.claim_inline():
                    inline.setdefault(q, []).append(job)
                else:
                    q.put(job)
            return session.pending()
        except TensordError as e:  # a corrupt ring: only this session ends
            log.warning("session %s: %s", session.id[:8], e)
            self._end(session, e)
        except Exception as e:  # a daemon bug ends this session only, with a reason
            log.exception("session %s failed", session.id[:8])
            self._end(session, InternalError(f"session failed: {type(e).__name__}: {e}",
                                             fatal=True))
        return False

    def _end(self, session: Session, err: TensordError) -> None:
        self.remove(session)
        session.on_fatal(err)  # hands the error to the control loop; never blocks

    def _spin(self, ready: dict[Session, None]) -> None:
        """Poll every session's request ring for the spin budget before sleeping, in the
        native core without the GIL. SPIN_GUARD keeps the mappings alive meanwhile."""
        with self._lock:
            sessions = [s for s in self._sessions if not s.stopped]
        try:
            with SPIN_GUARD:
                found = _ring.spin_any(tuple(s.seg.requests.core for s in sessions),
                                       int(self.spin * 1e9))
        except ValueError:  # a session ended meanwhile; the next pass goes without it
            return
        if found >= 0:
            for s in sessions:  # the one found, and any other with records by now
                if s.pending():
                    ready[s] = None


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):  # already drained
        os.read(fd, 8)
