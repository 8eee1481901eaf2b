"""The control loop: one thread (the main one) accepts clients and serves every control
connection from one epoll call; the dispatcher (serving/) serves their rings. Nothing here runs
per connection: a connection is a state machine (connection.py), a slow admin load runs on a
short-lived thread and answers through the loop. With no handshake under way the loop sleeps
without a timeout, so an idle daemon never wakes."""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable

from ..config import DaemonConfig
from ..models.registry import Registry
from ..serving.dispatcher import Dispatcher
from ..serving.executor import Executor
from .admin import ModelControl
from .connection import Connection, Services, SessionCounter

log = logging.getLogger(__name__)


_TRANSIENT_ACCEPT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}
_READ = select.EPOLLIN | select.EPOLLRDHUP
# Connections accepted per wake-up of the listener, so a connect flood cannot starve the
# connections already being served.
ACCEPT_BURST = 32


class AddressInUse(RuntimeError):
    pass


class Server:
    def __init__(self, config: DaemonConfig, registry: Registry, executor: Executor):
        self.config = config
        self.registry = registry
        self.executor = executor
        self.path = config.socket_path()
        self.dispatcher = Dispatcher(executor, config.spin_us)
        self.services = Services(
            config=config, registry=registry, executor=executor, dispatcher=self.dispatcher,
            sessions=SessionCounter(config.max_sessions),
            control=ModelControl(registry, executor, config.base_dir),
            run_aside=self._run_aside, call_soon=self.call_soon, want_write=self._want_write,
            forget=self._forget)
        self._conns: dict[int, Connection] = {}
        self._deadlines: list[tuple[float, int, Connection]] = []  # a heap
        self._soon: collections.deque[Callable[[], None]] = collections.deque()
        self._stopping = False
        self._ep = select.epoll()
        # Posted by shutdown() and call_soon() from other threads (and signal handlers).
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._ep.register(self._wake, select.EPOLLIN)
        self._listener: socket.socket | None = None
        self._accept_paused_until = 0.0

    @property
    def sessions(self) -> SessionCounter:
        return self.services.sessions

    def listen(self) -> None:
        _claim_path(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        os.chmod(self.path, self.config.socket_mode)
        s.listen(128)
        s.setblocking(False)
        self._listener = s
        self._ep.register(s, select.EPOLLIN)
        self.dispatcher.start()
        log.info("listening on %s, models: %s", self.path,
                 ", ".join(m.name for m in self.registry.infos()))

    # -- cross-thread entry points ----------------------------------------------------------

    def shutdown(self) -> None:
        """Stop serving (safe from a signal handler and any thread)."""
        self._stopping = True
        os.eventfd_write(self._wake, 1)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run fn on the control loop."""
        self._soon.append(fn)
        os.eventfd_write(self._wake, 1)

    def _run_aside(self, job: Callable[[], object],
                   done: Callable[[object, BaseException | None], None]) -> None:
        def work() -> None:
            try:
                result, err = job(), None
            except BaseException as e:  # handed back to the loop, which answers the client
                result, err = None, e
            self.call_soon(lambda: done(result, err))

        threading.Thread(target=work, name="admin", daemon=True).start()

    # -- connections ------------------------------------------------------------------------

    def _want_write(self, conn: Connection, on: bool) -> None:
        with contextlib.suppress(OSError):
            self._ep.modify(conn.fileno(), _READ | (select.EPOLLOUT if on else 0))

    def _forget(self, conn: Connection) -> None:
        fd = conn.fileno()
        if self._conns.get(fd) is conn:
            del self._conns[fd]
            with contextlib.suppress(OSError):
                self._ep.unregister(fd)

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(ACCEPT_BURST):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _TRANSIENT_ACCEPT:
                    # Out of file descriptors or memory: keep serving the connections we
                    # have, and look at the listener again after a pause instead of spinning.
                    log.warning("accept failed (%s); raise LimitNOFILE or max_sessions "
                                "headroom", e)
                    self._accept_paused_until = time.monotonic() + 0.1
                    self._ep.modify(self._listener, 0)
                    return
                raise
            try:
                conn = Connection(sock, self.services)
            except OSError as e:
                log.warning("dropping a connection: %s", e)
                sock.close()
                continue
            self._conns[conn.fileno()] = conn
            self._ep.register(conn.fileno(), _READ)
            heapq.heappush(self._deadlines, (conn.deadline, id(conn), conn))

    # -- the loop -----------------------------------------------------------------------------

    def serve_forever(self) -> None:
        assert self._listener is not None, "call listen() first"
        while not self._stopping:
            events = self._ep.poll(self._timeout())
            for fd, ev in events:
                if fd == self._wake:
                    with contextlib.suppress(OSError):
                        os.eventfd_read(self._wake)
                elif fd == self._listener.fileno():
                    self._accept()
                else:
                    conn = self._conns.get(fd)
                    if conn is None:
                        continue
                    if ev & select.EPOLLOUT:
                        conn.on_writable()
                    if ev & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP |
                             select.EPOLLERR) and not conn.closed:
                        conn.on_readable()
            while self._soon:
                self._soon.popleft()()
            self._expire()
        self._close()

    def _timeout(self) -> float:
        """Seconds until the next handshake deadline or accept retry; -1: none, sleep."""
        now = time.monotonic()
        while self._deadlines and (self._deadlines[0][2].deadline is None
                                   or self._deadlines[0][2].closed):
            heapq.heappop(self._deadlines)
        times = [t for t in (self._accept_paused_until,) if t > now]
        if self._deadlines:
            times.append(self._deadlines[0][0])
        return max(0.0, min(times) - now) if times else -1

    def _expire(self) -> None:
        now = time.monotonic()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._ep.modify(self._listener, select.EPOLLIN)
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, conn = heapq.heappop(self._deadlines)
            if conn.deadline is not None and not conn.closed:
                conn.on_deadline()

    def _close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for c in list(self._conns.values()):
            c.goodbye("daemon is shutting down")
        self.dispatcher.stop()
        self.executor.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        log.info("stopped")


def _claim_path(path: str) -> None:
    """Remove a socket file left by a dead daemon; refuse if a live one answers on it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AddressInUse(f"{path} exists and is not a socket; remove it or use --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError as e:
        raise AddressInUse(f"{path} exists and is not a usable socket ({e}); remove it") from None
    finally:
        probe.close()
    raise AddressInUse(f"another daemon is listening on {path}; stop it or use --socket")
