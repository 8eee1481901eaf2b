"""One client's control connection (SPEC §2): the handshake, control messages and the session's
lifetime, as a state machine the control loop (server.py) drives from readiness events. It owns
no thread: the session lives exactly as long as this connection."""

from __future__ import annotations

import contextlib
import errno
import logging
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import __version__, metrics
from ..config import DaemonConfig
from ..contract.errors import (
    ErrorCode,
    InternalError,
    PermissionDeniedError,
    ProtocolError,
    ResourceError,
    TensordError,
    TooLargeError,
    VersionError,
)
from ..contract.frames import MAX_FRAME, FrameBuffer, encode_frame
from ..contract.layout import ring_capacity, segment_size
from ..contract.messages import (
    SUPPORTED_VERSIONS,
    Attached,
    Draining,
    Goodbye,
    Health,
    Hello,
    Load,
    ModelList,
    Models,
    ModelStats,
    Ok,
    Ping,
    Pong,
    Ready,
    Reload,
    Stats,
    Unload,
    Welcome,
    error_message,
    for_version,
)
from ..models.registry import Registry
from ..ratelog import PerUid, RateLimited
from ..serving.core import Serving, SessionHandle
from ..serving.executor import Executor
from ..transport.segment import Segment
from .admin import ModelControl
from .limits import Admission, Grant

log = logging.getLogger(__name__)
# Refused and failed connections: any local user can cause as many as they like.
_refusals = RateLimited(log)
# Sessions opened, closed and ended by an error, per uid with a summary per period (a client
# churning sessions wrote two lines per session: 455 KB/s in the hostile run, issue 19.9).
# The control loop (server.py) calls its flush.
SESSION_LOG = PerUid(log)

HANDSHAKE_TIMEOUT = 10.0
# Replies a client has not read yet: past this it is not reading its socket, and is dropped
# rather than buffered without bound.
MAX_UNSENT = 4 << 20
RECV_SIZE = 1 << 16

HELLO, ATTACH, SERVING, CLOSED = range(4)


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


@dataclass
class Services:
    """What every connection shares; one per daemon."""

    config: DaemonConfig
    registry: Registry
    executor: Executor
    serving: Serving
    admission: Admission
    control: ModelControl
    # Runs a slow job (an admin load) off the control loop, then calls back on the loop.
    run_aside: Callable[[Callable[[], object], Callable[[object, BaseException | None], None]],
                        None]
    # Every model's scheduling counters (SPEC `model_stats`).
    stats: Callable[[], list]
    # The daemon's readiness (SPEC `health_report`).
    health: Callable[[int], object]
    # Calls fn on the control loop from any thread.
    call_soon: Callable[[Callable[[], None]], None]
    # The connection wants (True) or no longer wants (False) to hear when it can write.
    want_write: Callable[[Connection, bool], None]
    # The connection is closing: stop watching its socket (before the socket closes).
    forget: Callable[[Connection], None]
    # Out of descriptors: refuse up to n other connections still waiting for their
    # handshake, the longest-waiting first; returns how many were refused.
    make_room: Callable[[Connection, int], int]
    # Sessions or admission counts changed (gauges, systemd STATUS=).
    changed: Callable[[], None]
    # An ended session's segment still holds responses the client has not released:
    # (segment, uid, pid, bytes kept), called on any thread (lingering.py counts them).
    linger: Callable[[Segment, int, int, int], None] = lambda *_: None


class Connection:
    def __init__(self, sock: socket.socket, services: Services):
        self.sock = sock
        self.s = services
        self.peer = peer_credentials(sock)
        sock.setblocking(False)
        self.state = HELLO
        self.deadline: float | None = time.monotonic() + HANDSHAKE_TIMEOUT
        self.session: SessionHandle | None = None
        self._frames = FrameBuffer()
        self._out = bytearray()
        self._writing = False  # the loop watches for writability
        self._seg: Segment | None = None
        self._grant: Grant | None = None
        self._segment: Segment | None = None  # the session's, until the core has freed it
        self._client = ""
        self.version = max(SUPPORTED_VERSIONS)  # the version the handshake chose
        self.control_only = False  # no session: control messages only (SPEC hello)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def closed(self) -> bool:
        return self.state == CLOSED

    # -- events from the control loop ---------------------------------------------------------

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.close(log_reason=f"read failed: {e}")
            return
        if not data:
            self.close(log_reason="peer closed the connection")
            return
        self._frames.feed(data)
        self._handle_frames()

    def on_writable(self) -> None:
        self._flush()

    def on_deadline(self) -> None:
        err = ProtocolError(f"the handshake did not complete within {HANDSHAKE_TIMEOUT:.0f} s",
                            fatal=True)
        err.reason = "handshake_timeout"
        self.fail(err)

    def _handle_frames(self) -> None:
        while self.state != CLOSED:
            msg = None
            try:
                msg = self._frames.next()
                if msg is None:
                    return
                self._handle(msg)
            except TensordError as e:
                if self.state != SERVING:
                    e.fatal = True  # every handshake failure ends the connection
                if e.fatal:
                    self.fail(e)
                    return
                rid = getattr(msg, "id", 0) if msg is not None else getattr(e, "request_id", 0)
                self.send(error_message(e, rid, self.version))
            except OSError as e:
                # Not the socket: the session could not be set up (mmap, fallocate, eventfds).
                _refusals.warning("connection of pid %d: %s", self.peer.pid, e)
                self.fail(ResourceError(f"the daemon could not set up the session: {e}",
                                        fatal=True))
                return
            except Exception as e:  # a daemon bug ends this connection only, with a reason
                _refusals.exception("connection of pid %d failed", self.peer.pid)
                self.fail(InternalError(f"the daemon failed serving this connection: "
                                        f"{type(e).__name__}: {e}", fatal=True))
                return

    # -- the protocol ---------------------------------------------------------------------------

    def _handle(self, msg) -> None:
        if self.state == HELLO:
            if not isinstance(msg, Hello):
                raise ProtocolError(f"expected hello, got {type(msg).TYPE}", fatal=True)
            self._hello(msg)
        elif self.state == ATTACH:
            if not isinstance(msg, Attached):
                raise ProtocolError(f"expected attached, got {type(msg).TYPE}", fatal=True)
            self._attached()
        elif isinstance(msg, Ping):
            self.send(Pong(id=msg.id))
        elif isinstance(msg, Models):
            self.send(ModelList(id=msg.id, models=[for_version(m, self.version)
                                                   for m in self.s.registry.infos()]))
        elif isinstance(msg, Stats):
            self.send(ModelStats(id=msg.id, models=self.s.stats()))
        elif isinstance(msg, Health):
            self.send(self.s.health(msg.id))
        elif isinstance(msg, Goodbye):
            self.close()
        elif isinstance(msg, (Load, Unload, Reload)):
            self._admin(msg)
        else:
            raise ProtocolError(
                f"{type(msg).TYPE} is not a message a client sends after the handshake",
                code=ErrorCode.BAD_MESSAGE)

    def _hello(self, hello: Hello) -> None:
        cfg = self.s.config
        version = self.version = _choose_version(hello)
        if hello.control_only:
            self._control_hello(version, hello)
            return
        req = ring_capacity(hello.request_ring, cfg.default_ring)
        resp = ring_capacity(hello.response_ring, cfg.default_ring)
        if max(req, resp) > cfg.max_ring:
            raise TooLargeError(
                f"asked for rings of {req} and {resp} bytes; this daemon allows at most "
                f"{cfg.max_ring} per ring (max_ring in its config)", fatal=True,
                limit=cfg.max_ring)
        # Counted before the segment exists: the next handshake sees these bytes as taken.
        adm = self.s.admission
        self._grant = adm.admit(self.peer.uid, segment_size(req, resp))
        self.s.changed()
        # SPEC: at most 128 bytes (not characters), cut at a character boundary.
        self._client = hello.client.encode()[:128].decode("utf-8", "ignore")
        session_id = secrets.token_hex(16)
        self._seg = self._create_segment(session_id, req, resp)
        uid, pid, linger = self.peer.uid, self.peer.pid, self.s.linger
        self._seg.on_linger = lambda seg, kept: linger(seg, uid, pid, kept)
        adm.charged(self._grant)
        welcome = Welcome(version=version, session=session_id,
                          segment_size=self._seg.header.segment_size, request_ring=req,
                          response_ring=resp, max_frame=MAX_FRAME,
                          daemon=f"tensord {__version__}")
        self._send_with_fds(encode_frame(welcome), self._seg.descriptors())
        self._session_id = session_id
        self.state = ATTACH

    def _control_hello(self, version: int, hello: Hello) -> None:
        """A connection for control messages only (`tensord health`, stats, admin): no
        segment, no eventfds, no admission of memory, nothing logged at INFO. The welcome
        says so with zero sizes and carries no descriptors (SPEC §2.4)."""
        self.s.admission.admit_control()
        self.control_only = True
        self._client = hello.client[:128]
        self._session_id = secrets.token_hex(16)
        self.send(Welcome(version=version, session=self._session_id, segment_size=0,
                          request_ring=0, response_ring=0, max_frame=MAX_FRAME,
                          daemon=f"tensord {__version__}"))
        self.state = ATTACH

    def _create_segment(self, session_id: str, req: int, resp: int) -> Segment:
        # Others' memory not yet allocated: sessions admitted, forward passes that reserved theirs
        reserved = self.s.admission.uncharged - self._grant.size + self.s.serving.compute.held
        try:
            return Segment.create(session_id, req, resp, reserved)
        except OSError as e:
            # Out of descriptors (it needs five): connections that never sent hello give
            # theirs up first, then it is tried once more.
            if e.errno not in (errno.EMFILE, errno.ENFILE) or not self.s.make_room(self, 6):
                raise
        return Segment.create(session_id, req, resp, reserved)

    def _attached(self) -> None:
        if self.control_only:
            self.state = SERVING
            self.deadline = None
            self.send(Ready())
            log.debug("control connection: %r pid %d uid %d", self._client, self.peer.pid,
                      self.peer.uid)
            return
        seg, self._seg = self._seg, None
        try:
            self.session = self.s.serving.add_session(
                self._session_id, seg, self.peer.uid,
                high_priority=self.peer.uid in self.s.config.priority_uids,
                park_limit=self.s.config.max_parked_per_session,
                on_fatal=self._fatal_from_any_thread, on_freed=self._session_freed)
            self.s.serving.set_version(self.session, self.version)
        finally:
            seg.close_fd()  # the core maps it itself; the client holds its own descriptor
        self._segment = seg  # closed (pages punched) once the core has freed the session
        self.state = SERVING
        self.deadline = None
        self.send(Ready())
        h = seg.header
        SESSION_LOG.log(self.peer.uid, "opened", logging.INFO,
                        "session %s: %r pid %d uid %d, rings %d/%d bytes", self.session.id[:8],
                        self._client, self.peer.pid, self.peer.uid, h.request_ring_capacity,
                        h.response_ring_capacity)

    def _admin(self, msg) -> None:
        if self.peer.uid not in self.s.config.admin_uids:
            raise PermissionDeniedError(
                f"{msg.TYPE} is an admin message; uid {self.peer.uid} is not in the daemon's "
                "admin_uids (set [daemon] admin_uids in its config)")
        control = self.s.control
        if isinstance(msg, Load):
            def job():
                return control.load(msg.name, msg.config, self.peer.uid)
        elif isinstance(msg, Reload):
            def job():
                return control.reload(msg.name)
        else:
            def job():
                return control.unload(msg.name)

        def done(_result, err: BaseException | None) -> None:
            if self.state != SERVING:
                return
            if isinstance(err, TensordError):
                self.send(error_message(err, msg.id, self.version))
            elif err is not None:
                self.send(error_message(InternalError(
                    f"{msg.TYPE} failed inside the daemon: {type(err).__name__}: {err}"),
                    msg.id))
            else:
                self.send(Ok(id=msg.id))

        # A load takes seconds: only this client waits for it, never the control loop.
        self.s.run_aside(job, done)

    # -- sending ------------------------------------------------------------------------------

    def send(self, msg) -> None:
        if self.state == CLOSED:
            return
        self._out += encode_frame(msg)
        if len(self._out) > MAX_UNSENT:
            self.close(log_reason=f"it does not read its socket ({len(self._out)} bytes of "
                       "replies unsent)")
            return
        self._flush()

    def _send_with_fds(self, data: bytes, fds: list[int]) -> None:
        # The descriptors ride on the frame's first byte (SPEC §2.4); the socket is fresh and
        # empty, so at least that byte goes at once.
        sent = socket.send_fds(self.sock, [data], fds)
        self._out += data[sent:]
        self._flush()

    def _flush(self) -> None:
        while self._out:
            try:
                n = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._writing = True
                    self.s.want_write(self, True)
                return
            except OSError as e:
                self.close(log_reason=f"write failed: {e}")
                return
            del self._out[:n]
        if self._writing:
            self._writing = False
            self.s.want_write(self, False)

    # -- the end --------------------------------------------------------------------------------

    def _session_freed(self) -> None:
        """The core has unmapped the session (any thread): punch its pages, unmap ours, and
        its memory stops counting."""
        def freed() -> None:
            if self._segment is not None:
                self._segment.close()
                self._segment = None
            self._release_grant()

        self.s.call_soon(freed)

    def _release_grant(self) -> None:
        if self._grant is not None:
            self.s.admission.release(self._grant)
            self._grant = None
            self.s.changed()

    def fail(self, err: TensordError) -> None:
        """Tell the client why (best effort, without blocking), then close."""
        err.fatal = True
        if self.state in (HELLO, ATTACH):  # refused before its session started
            metrics.rejected(getattr(err, "reason", None) or err.code.name.lower())
        if self.state == SERVING and not self.control_only:  # the session ends with an error
            SESSION_LOG.log(self.peer.uid, "ended by an error", logging.WARNING,
                            "session %s of pid %d uid %d ends: %s", self._session_id[:8],
                            self.peer.pid, self.peer.uid, err)
        else:
            _refusals.info("closing connection of pid %d uid %d: %s", self.peer.pid,
                           self.peer.uid, err)
        self._out += encode_frame(error_message(err, 0, self.version))
        with contextlib.suppress(OSError):
            self.sock.send(self._out)
        self.close()

    def _fatal_from_any_thread(self, err: TensordError) -> None:
        """The dispatcher found the session's ring corrupt."""
        self.s.call_soon(lambda: self.fail(err))

    def drain(self, grace_ms: int) -> None:
        """The daemon is stopping: tell the client (SPEC `draining`); a connection still in
        its handshake is closed."""
        if self.state == SERVING and not self.control_only:
            self.send(Draining(grace_ms=grace_ms))
        elif self.state == SERVING:
            # Nothing of it is in flight on a ring: it need not hold the drain up.
            self.goodbye("the daemon is draining (stopping)")
        else:
            self.close(log_reason="the daemon is draining")

    def goodbye(self, reason: str) -> None:
        """The daemon is going away: say so (best effort) and close."""
        if self.state == SERVING:
            self._out += encode_frame(Goodbye(reason=reason))
            with contextlib.suppress(OSError):
                self.sock.send(self._out)
        self.close()

    def close(self, log_reason: str | None = None) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        if log_reason:
            log.debug("connection of pid %d ended: %s", self.peer.pid, log_reason)
        if self._seg is not None:
            self._seg.close()
            self._seg = None
        if self.session is not None:
            served = self.session.served
            # The core stops serving it; its memory and eventfds go once no batch holds it
            # (then _session_freed releases the rest).
            self.session.end()
            SESSION_LOG.log(self.peer.uid, "closed", logging.INFO,
                            "session %s of uid %d closed after %d requests",
                            self.session.id[:8], self.peer.uid, served)
        elif self._grant is not None:  # no session: nothing of it can still be mapped
            self._release_grant()
        if self.control_only:
            self.control_only = False
            self.s.admission.release_control()
        self.s.forget(self)
        with contextlib.suppress(OSError):
            self.sock.close()


def _choose_version(hello: Hello) -> int:
    common = [v for v in SUPPORTED_VERSIONS if hello.min_version <= v <= hello.max_version]
    if not common:
        raise VersionError(
            f"client speaks protocol versions {hello.min_version}..{hello.max_version}, this "
            f"daemon speaks {list(SUPPORTED_VERSIONS)}: upgrade the older side", fatal=True)
    return max(common)
