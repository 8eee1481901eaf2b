"""The dispatcher: one thread waits on every session at once and hands their requests on.

It sleeps in one epoll call (the GIL released) on each session's request-data and
response-space eventfds (SPEC §4.5); when woken it drains every ready session's ring in a
round-robin pass, at most MAX_PER_PASS records per session per pass, so no session can make
another wait for more than one bounded slice of work, and hands each request to where its
model runs (executor.py). An idle session costs nothing: no thread, no timer, no wake-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time

from ..contract.errors import InternalError, TensordError
from ..transport.segment import EFD_REQ_DATA, EFD_RESP_SPACE
from .executor import Executor
from .session import Session

log = logging.getLogger(__name__)

# Records taken from one session per pass: bounds the work one client causes before the
# others get their turn (PADs count too: the native core counts every record it walks).
MAX_PER_PASS = 16


class Dispatcher:
    def __init__(self, executor: Executor, spin_us: int = 0):
        self.executor = executor
        self.spin = spin_us / 1e6
        self._ep = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._ep.register(self._wake, select.EPOLLIN)
        self._lock = threading.Lock()
        self._by_fd: dict[int, tuple[Session, bool]] = {}  # eventfd -> (session, is requests)
        self._sessions: dict[Session, None] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, session: Session) -> None:
        rd, ps = session.seg.efds[EFD_REQ_DATA], session.seg.efds[EFD_RESP_SPACE]
        with self._lock:
            self._by_fd[rd] = (session, True)
            self._by_fd[ps] = (session, False)
            self._sessions[session] = None
            self._ep.register(rd, select.EPOLLIN)
            self._ep.register(ps, select.EPOLLIN)
        os.eventfd_write(self._wake, 1)  # records may be there already: look once

    def remove(self, session: Session) -> None:
        """Forget a session; its eventfds may be closed once this returns. A pass already
        under way skips it (Session.take checks `stopped` under the session's lock)."""
        with self._lock:
            if session in self._sessions:
                del self._sessions[session]
                for fd in session.seg.efds[EFD_REQ_DATA], session.seg.efds[EFD_RESP_SPACE]:
                    self._by_fd.pop(fd, None)
                    with contextlib.suppress(OSError):
                        self._ep.unregister(fd)

    def sessions(self) -> int:
        return len(self._sessions)

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        if self._thread.is_alive():
            self._thread.join()
        self._ep.close()
        os.close(self._wake)

    # -- the loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        ready: dict[Session, None] = {}  # an ordered set: round-robin in arrival order
        while not self._stopping:
            if not ready and self.spin > 0:
                self._spin(ready)
            try:
                events = self._ep.poll(0 if ready else -1)
            except InterruptedError:
                continue
            for fd, _ in events:
                _drain(fd)
                if fd == self._wake:
                    continue
                with self._lock:
                    entry = self._by_fd.get(fd)
                if entry is None:
                    continue
                session, is_requests = entry
                if not is_requests:
                    session.flush()  # the client freed response space
                ready[session] = None
            for session in list(ready):
                if not self._serve(session):
                    del ready[session]

    def _serve(self, session: Session) -> bool:
        """One bounded slice of a session's requests; True when it has more waiting."""
        try:
            for job in session.take(MAX_PER_PASS):
                self.executor.submit(job.model, session.execute, job)
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
        """Poll every session's request ring for the spin budget before sleeping."""
        end = time.monotonic() + self.spin
        with self._lock:
            sessions = list(self._sessions)
        while time.monotonic() < end and not self._stopping:
            for s in sessions:
                if s.pending():
                    ready[s] = None
            if ready:
                return
            os.sched_yield()


def _drain(fd: int) -> None:
    with contextlib.suppress(OSError):  # EAGAIN: already drained; EBADF: closed meanwhile
        os.read(fd, 8)
