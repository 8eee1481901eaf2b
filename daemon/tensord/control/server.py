"""The control loop: one thread (the main one) accepts clients and serves every control
connection from one epoll call; the native serving core (serving/core.py) serves their rings.
Nothing here runs per connection: a connection is a state machine (connection.py), a slow
admin load runs on a short-lived thread and answers through the loop. With no handshake under
way the loop sleeps without a timeout, so an idle daemon never wakes (unless systemd asks for
watchdog pings).

Nothing a client does can stop the loop: connections that have not sent hello are bounded
(max_pending; past it, and when descriptors run out, the longest-waiting one is refused), every
handler's failure ends one connection, and a thread that cannot start fails one admin call."""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable

from .. import metrics, sdnotify
from ..config import ConfigError, DaemonConfig
from ..contract.errors import ResourceError, ShuttingDownError
from ..contract.messages import HealthReport
from ..models.memory import ComputeBudget, default_limit
from ..models.registry import Registry
from ..ratelog import RateLimited
from ..serving.core import Serving
from ..serving.executor import Executor
from ..unixsock import AddressInUse, claim
from . import model_gauges
from .admin import LoadPolicy, ModelControl
from .connection import HELLO, SESSION_LOG, Connection, Services
from .limits import Admission
from .lingering import Lingering
from .reconfig import Reconfigurer
from .takeover import Successor

log = logging.getLogger(__name__)
_accept_log = RateLimited(log, burst=3, period=10.0)
_bug_log = RateLimited(log)


_READ = select.EPOLLIN | select.EPOLLRDHUP
# Connections accepted per wake-up of the listener, so a connect flood cannot starve the
# connections already being served.
ACCEPT_BURST = 32


class Server:
    def __init__(self, config: DaemonConfig, registry: Registry, executor: Executor):
        self.config = config
        self.registry = registry
        self.executor = executor
        self.path = config.socket_path()
        admission = Admission.from_config(config)  # the per-uid defaults resolved
        compute = ComputeBudget(config.max_compute_memory or default_limit(),
                                lambda: admission.uncharged)
        log.info("forward passes may take %d MiB of memory (max_compute_memory%s)",
                 compute.limit >> 20, "" if config.max_compute_memory else
                 ": half of what the daemon has at start")
        self.serving = Serving(registry, executor, config.spin_us, admission.max_memory,
                               admission.max_memory_per_uid, compute)
        admission.parked_of = self.serving.engine.parked  # unread responses count too
        self.services = Services(
            config=config, registry=registry, executor=executor, serving=self.serving,
            admission=admission,
            control=ModelControl(registry, executor, config.base_dir,
                                 LoadPolicy.from_config(config)),
            stats=self.serving.stats, health=self.health, run_aside=self._run_aside,
            call_soon=self.call_soon,
            want_write=self._want_write,
            forget=self._forget, make_room=self._make_room, changed=self._changed,
            linger=self._linger)
        self._lingering = Lingering(self.services.admission)
        self._conns: dict[int, Connection] = {}
        self._deadlines: list[tuple[float, int, Connection]] = []  # a heap
        self._soon: collections.deque[Callable[[], None]] = collections.deque()
        self._reconfig = Reconfigurer(self.services.control, config.path or None,
                                      config.models)
        self._stopping = False
        self._drain_requested = False
        self.draining = False
        self._drain_until = 0.0
        self._ep = select.epoll()
        # Posted by shutdown() and call_soon() from other threads (and signal handlers).
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._ep.register(self._wake, select.EPOLLIN)
        # signal.set_wakeup_fd's end (cli.py): CPython runs a Python signal handler only on
        # the main thread, and only once that thread runs bytecode. The kernel may hand a
        # process-directed SIGTERM to any thread (the dispatcher, a worker, a new thread
        # unmasking signals); the main thread then slept on in epoll with no timeout and the
        # daemon never drained (issue 19.10). The C-level handler writes the signal number
        # here from whichever thread took it, which wakes this loop, and the handler runs.
        self._sig_r, self._sig_w = socket.socketpair()
        for s in (self._sig_r, self._sig_w):
            s.setblocking(False)
        self._ep.register(self._sig_r, select.EPOLLIN)
        self._hard_stop: threading.Timer | None = None
        self._listener: socket.socket | None = None
        self._owns_path = False  # socket activation: the manager owns the socket file
        self._accept_paused_until = 0.0
        # Accepted connections that have not sent hello yet, oldest first (an ordered set).
        self._pending: dict[Connection, None] = {}
        self._dirty = True  # gauges and STATUS= need refreshing
        self._status = ""
        self._watchdog: float | None = None  # set as serving starts (serve_forever)
        self._watchdog_next = 0.0
        self._metrics: metrics.Listener | None = None
        self._successor = Successor(self.call_soon)
        self._gauges: model_gauges.ModelGauges | None = None

    @property
    def signal_fd(self) -> int:
        """For signal.set_wakeup_fd: a write here wakes the control loop."""
        return self._sig_w.fileno()

    @property
    def admission(self) -> Admission:
        return self.services.admission

    def listen(self, inherited: socket.socket | None = None, owns_path: bool = False) -> None:
        """Listen on the configured path, or on `inherited` (socket activation: the manager
        made the socket, its path and mode; the daemon leaves the file alone, unless
        owns_path: a takeover of a daemon that made it, control/takeover.py)."""
        if inherited is not None:
            s = _check_inherited(inherited)
            self.path = s.getsockname() or self.path
            self._owns_path = owns_path
        else:
            claim(self.path, "--socket")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.bind(self.path)
                os.chmod(self.path, self.config.socket_mode)
            except OSError as e:
                s.close()
                raise AddressInUse(f"cannot create the socket {self.path}: {e}; use --socket "
                                   "with a directory the daemon's user may write") from None
            self._owns_path = True
            s.listen(128)
        s.setblocking(False)
        if self.config.metrics:
            try:
                self._metrics = metrics.Listener(self.config.metrics, self.config.socket_mode)
            except (ValueError, OSError) as e:
                raise ConfigError(f"[daemon] metrics = {self.config.metrics!r}: {e}") from None
            self._gauges = model_gauges.register(lambda: self.health(1))
            self._metrics.start()
        self._listener = s
        self._ep.register(s, select.EPOLLIN)
        self.serving.start()
        log.info("listening on %s%s, models: %s", self.path,
                 "" if self._owns_path else " (socket activation)",
                 ", ".join(m.name for m in self.registry.infos()))

    def health(self, request_id: int) -> HealthReport:
        """Ready unless draining or a model's forward pass has run past stuck_after_s."""
        models = self.serving.health(self.config.stuck_after_s)
        stuck = [m for m in models if not m.ready]
        if self.draining:
            reason = "the daemon is draining (stopping)"
        elif stuck:
            reason = "; ".join(f"model {m.name!r} has run one forward pass for "
                               f"{m.running_ms / 1e3:.0f} s (stuck_after_s = "
                               f"{self.config.stuck_after_s:g})" for m in stuck)
        else:
            reason = ""
        return HealthReport(id=request_id, ready=not reason, draining=self.draining,
                            reason=reason, models=models)

    # -- cross-thread entry points ----------------------------------------------------------

    def shutdown(self) -> None:
        """Stop serving (safe from a signal handler and any thread): drain first (SIGTERM);
        a second call while draining stops at once."""
        if self._drain_requested:
            self._stopping = True
        self._drain_requested = True
        os.eventfd_write(self._wake, 1)

    def reload_config(self) -> None:
        """SIGHUP (safe from a signal handler): converge on the config file's models, on a
        thread of its own; the daemon keeps serving meanwhile."""
        self.call_soon(lambda: self._run_aside(self._reconfig.apply, lambda *_: None))

    def upgrade(self) -> None:
        """SIGUSR2 (safe from a signal handler): start a successor that takes the socket over
        once its models are loaded, then drain (control/takeover.py)."""
        self.call_soon(lambda: self._successor.start(self._listener, self._owns_path,
                                                     self._hand_over))

    def _hand_over(self, go: Callable[[], None]) -> None:
        """The successor is ready: stop accepting (it accepts from now on, queued connections
        included), leave it the socket file and the metrics address, and drain."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._ep.unregister(self._listener)
            self._listener.close()
            self._listener = None
        self._owns_path = False
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        go()
        self._drain_requested = True

    def stop_now(self) -> None:
        """Stop without draining."""
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

        try:
            threading.Thread(target=work, name="admin", daemon=True).start()
        except RuntimeError as e:  # at the task limit: this call fails, nothing else
            done(None, ResourceError(f"the daemon cannot start a thread for this ({e}): it is "
                                     "at its task limit (systemd TasksMax=, RLIMIT_NPROC); "
                                     "try again later"))

    # -- connections ------------------------------------------------------------------------

    def _want_write(self, conn: Connection, on: bool) -> None:
        with contextlib.suppress(OSError):
            self._ep.modify(conn.fileno(), _READ | (select.EPOLLOUT if on else 0))

    def _forget(self, conn: Connection) -> None:
        self._pending.pop(conn, None)
        self._dirty = True
        fd = conn.fileno()
        if self._conns.get(fd) is conn:
            del self._conns[fd]
            with contextlib.suppress(OSError):
                self._ep.unregister(fd)

    def _changed(self) -> None:
        self._dirty = True

    def _linger(self, seg, uid: int, pid: int, kept: int) -> None:
        """Any thread (a session is freed by whichever thread finished its last job)."""
        def add() -> None:
            if self._stopping:
                seg.close()
                return
            self._lingering.add(seg, uid, pid, kept)
            self._dirty = True
        self.call_soon(add)

    def _prune_pending(self) -> None:
        for c in [c for c in self._pending if c.state != HELLO]:
            del self._pending[c]

    def _evict_oldest(self, why: str, reason: str, exclude: Connection | None = None) -> bool:
        """Refuse the connection that has waited longest for its hello; False: none waits."""
        self._prune_pending()
        for c in self._pending:
            if c is not exclude:
                err = ResourceError(why, fatal=True)
                err.reason = reason
                c.fail(err)  # forgets it, which drops it from _pending
                return True
        return False

    def _make_room(self, conn: Connection, n: int) -> int:
        freed = 0
        while freed < n and self._evict_oldest(_NO_FDS, "fds", exclude=conn):
            freed += 1
        return freed

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(ACCEPT_BURST):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE) and self._evict_oldest(_NO_FDS,
                                                                                  "fds"):
                    # A connection that never said hello gave its descriptor back: the
                    # next one in the queue (maybe a real client) gets it.
                    _accept_log.warning("accept failed (%s): refusing connections that have "
                                        "not sent hello; raise LimitNOFILE", e)
                    continue
                # Out of descriptors or memory with nothing to give back: keep serving the
                # connections we have, and look at the listener again after a pause instead
                # of spinning.
                _accept_log.warning("accept failed (%s); raise LimitNOFILE or max_sessions "
                                    "headroom", e)
                self._accept_paused_until = time.monotonic() + 0.1
                self._ep.modify(self._listener, 0)
                return
            try:
                conn = Connection(sock, self.services)
            except OSError as e:
                _accept_log.warning("dropping a connection: %s", e)
                sock.close()
                continue
            self._prune_pending()
            while len(self._pending) >= self.config.max_pending and self._evict_oldest(
                    f"more than max_pending={self.config.max_pending} connections are waiting "
                    "for their handshake and this one waited longest: send hello as soon as "
                    "the connection is made", "pending"):
                pass
            self._conns[conn.fileno()] = conn
            self._pending[conn] = None
            self._dirty = True
            self._ep.register(conn.fileno(), _READ)
            heapq.heappush(self._deadlines, (conn.deadline, id(conn), conn))

    # -- the loop -----------------------------------------------------------------------------

    def serve_forever(self) -> None:
        assert self._listener is not None, "call listen() first"
        # Asked now, not at construction: a successor (control/takeover.py) takes the
        # watchdog over from the daemon it replaces only once it serves.
        self._watchdog = sdnotify.watchdog_interval()
        while not self._stopping:
            try:
                events = self._ep.poll(self._timeout())
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == self._wake:
                    with contextlib.suppress(OSError):
                        os.eventfd_read(self._wake)
                elif fd == self._sig_r.fileno():
                    with contextlib.suppress(OSError):
                        self._sig_r.recv(4096)  # the handlers run as this thread goes on
                elif self._listener is not None and fd == self._listener.fileno():
                    self._guarded(self._accept)
                else:
                    conn = self._conns.get(fd)
                    if conn is None:
                        continue
                    if ev & select.EPOLLOUT:
                        self._guarded(conn.on_writable, conn)
                    if ev & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP |
                             select.EPOLLERR) and not conn.closed:
                        self._guarded(conn.on_readable, conn)
            while self._soon:
                self._guarded(self._soon.popleft())
            if self._drain_requested and not self.draining:
                self._guarded(self._begin_drain)
            if self.draining:
                self._guarded(self._check_drain)
            self._guarded(self._expire)
            if self._dirty:
                self._refresh()
        self._close()

    def _guarded(self, fn: Callable[[], None], conn: Connection | None = None) -> None:
        """Run one handler; whatever it raises (a daemon bug, MemoryError) ends at most the
        connection it was for, never the loop."""
        try:
            fn()
        except Exception as e:
            _bug_log.exception("control loop: %s failed: %s", getattr(fn, "__name__", fn), e)
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close(log_reason=f"the daemon failed serving it: {e}")

    def _refresh(self) -> None:
        """Gauges and the systemd status line, once per loop turn that changed them."""
        self._dirty = False
        adm = self.admission
        self._prune_pending()
        metrics.set_gauges(adm.sessions, adm.memory, len(self._pending))
        status = (f"serving {len(self.registry.infos())} models on {self.path}; "
                  f"{adm.sessions} sessions, {adm.memory >> 20} MiB of rings")
        if status != self._status:
            self._status = status
            sdnotify.notify(f"STATUS={status}")

    # -- graceful drain (SIGTERM) ----------------------------------------------------------------

    def _begin_drain(self) -> None:
        """Stop accepting, tell every session the daemon is draining (SPEC `draining`), and
        keep serving what they have already sent for up to drain_grace_s."""
        self.draining = True
        grace = self.config.drain_grace_s
        self._drain_until = time.monotonic() + grace
        sdnotify.notify(f"STATUS=draining: finishing queued and running requests "
                        f"(up to {grace:g} s)")
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._ep.unregister(self._listener)
            self._listener.close()
            self._listener = None
        for c in list(self._conns.values()):
            c.drain(int(grace * 1e3))
        log.info("draining %d sessions for up to %g s", len(self._conns), grace)
        # Whatever happens next (a forward pass that never returns, a thread that does not
        # join), the process is gone by grace + STOP_MARGIN_S: systemd and Kubernetes plan
        # with that bound, and a second SIGTERM is not something they send.
        self._hard_stop = threading.Timer(grace + STOP_MARGIN_S, _exit_now,
                                          args=(grace + STOP_MARGIN_S,))
        self._hard_stop.daemon = True
        self._hard_stop.start()

    def _check_drain(self) -> None:
        """Done when every client has said goodbye (each does once its requests in flight are
        answered, so none is cut off mid-call), or when the grace period ends: then what is
        still queued is answered SHUTTING_DOWN, unrun, and the rest are closed."""
        if self._conns and time.monotonic() < self._drain_until:
            return
        busy = [c for c in self._conns.values()
                if c.session is not None and not c.session.idle()]
        if busy:
            n = self.serving.cancel_queued(ShuttingDownError(
                "the daemon stopped before this request ran (its drain grace period ended): "
                "it did not run; send it again once the daemon is back"))
            log.warning("drain grace period over: %d sessions still busy, %d queued requests "
                        "answered SHUTTING_DOWN", len(busy), n)
        self._stopping = True

    def _timeout(self) -> float:
        """Seconds until the next handshake deadline, accept retry, watchdog ping or session
        log summary; -1: none, sleep."""
        now = time.monotonic()
        while self._deadlines and (self._deadlines[0][2].deadline is None
                                   or self._deadlines[0][2].closed):
            heapq.heappop(self._deadlines)
        times = [t for t in (self._accept_paused_until,) if t > now]
        if self._deadlines:
            times.append(self._deadlines[0][0])
        if self._watchdog:
            times.append(self._watchdog_next)
        for t in (SESSION_LOG.next_flush(), self._lingering.next_check()):
            if t is not None:
                times.append(t)
        if self.draining:
            times.append(now + 0.01)  # sessions going idle wake nobody: look again soon
        return max(0.0, min(times) - now) if times else -1

    def _expire(self) -> None:
        now = time.monotonic()
        SESSION_LOG.flush()
        if self._lingering:
            n = len(self._lingering)
            self._lingering.check(now)
            self._dirty = self._dirty or len(self._lingering) != n
        if self._watchdog and now >= self._watchdog_next:
            self._watchdog_next = now + self._watchdog
            # The loop is turning; the dispatcher is checked too where it can tell.
            alive = getattr(self.serving, "alive", None)
            if alive is None or alive():
                sdnotify.notify("WATCHDOG=1")
            else:
                log.error("the dispatcher thread is gone: no watchdog ping, systemd restarts "
                          "the daemon")
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            if self._listener is not None:
                self._ep.modify(self._listener, select.EPOLLIN)
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, conn = heapq.heappop(self._deadlines)
            if conn.deadline is not None and not conn.closed:
                conn.on_deadline()

    def _close(self) -> None:
        sdnotify.notify("STOPPING=1\nSTATUS=stopping")
        self._successor.abandon()  # an upgrade still loading does not outlive this daemon
        if self._metrics is not None:
            self._metrics.close()
        if self._gauges is not None:
            model_gauges.unregister(self._gauges)
        if self._listener is not None:
            self._listener.close()
        for c in list(self._conns.values()):
            c.goodbye("daemon is shutting down")
        # Requests still queued get SHUTTING_DOWN; their sessions are gone, so it is dropped.
        self.serving.cancel_queued(ShuttingDownError("the daemon stopped"))
        # Running forward passes may finish within what is left of the margin, no longer.
        self.serving.stop(timeout=STOP_MARGIN_S / 2)
        self._lingering.close()
        if self._owns_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        SESSION_LOG.flush(everything=True)
        log.info("stopped")


# What stopping may take past drain_grace_s: answering what was cancelled, joining the
# threads, the interpreter's exit.
STOP_MARGIN_S = 5.0


def _exit_now(after: float) -> None:
    log.error("the daemon did not stop within %g s of SIGTERM (drain_grace_s + %g s): "
              "exiting without finishing", after, STOP_MARGIN_S)
    logging.shutdown()
    os._exit(1)


_NO_FDS = ("the daemon is out of file descriptors and this connection waited longest for its "
           "handshake; connect again and send hello at once")


def _check_inherited(s: socket.socket) -> socket.socket:
    """The socket systemd passed must be a listening Unix stream socket."""
    if (s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM
            or not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
        raise AddressInUse("the socket passed by the service manager (LISTEN_FDS) is not a "
                           "listening Unix stream socket: use ListenStream=/path in the "
                           ".socket unit")
    return s
