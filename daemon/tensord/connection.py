"""One client's control connection: handshake, control messages, and the session's lifetime
(SPEC §2). The session lives exactly as long as this connection."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass

from . import __version__
from .admin import ModelControl
from .config import DaemonConfig
from .contract.errors import (
    ErrorCode,
    InternalError,
    PermissionDeniedError,
    ProtocolError,
    ResourceError,
    TensordError,
    TooLargeError,
    VersionError,
)
from .contract.frames import (
    MAX_FRAME,
    PeerClosed,
    encode_frame,
    read_frame,
    send_frame_with_fd,
)
from .contract.layout import ring_capacity
from .contract.messages import (
    SUPPORTED_VERSIONS,
    Attached,
    Goodbye,
    Hello,
    Load,
    ModelList,
    Models,
    Ok,
    Ping,
    Pong,
    Ready,
    Reload,
    Unload,
    Welcome,
    error_message,
)
from .executor import Executor
from .models.registry import Registry
from .session import Session
from .transport.segment import Segment, SessionNames

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
SEND_TIMEOUT = 5  # seconds


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


class Connection:
    def __init__(self, sock: socket.socket, config: DaemonConfig, registry: Registry,
                 executor: Executor, sessions: SessionCounter, control: ModelControl):
        self.sock = sock
        self.config = config
        self.registry = registry
        self.executor = executor
        self.sessions = sessions
        self.control = control
        self.peer = peer_credentials(sock)
        # A client that stops reading its socket must not block a daemon thread forever: a
        # send that cannot proceed for this long fails, and the connection ends.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT, 0))
        self.session: Session | None = None
        self._send_lock = threading.Lock()
        self._closed = threading.Event()

    def send(self, msg) -> None:
        data = encode_frame(msg)
        with self._send_lock:
            self.sock.sendall(data)

    def run(self) -> None:
        names: SessionNames | None = None
        counted = False
        try:
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT  # for the whole handshake
            hello = read_frame(self.sock, deadline)
            if not isinstance(hello, Hello):
                raise ProtocolError(f"expected hello, got {type(hello).TYPE}", fatal=True)
            version = _choose_version(hello)
            req = ring_capacity(hello.request_ring, self.config.default_ring)
            resp = ring_capacity(hello.response_ring, self.config.default_ring)
            if max(req, resp) > self.config.max_ring:
                raise TooLargeError(
                    f"asked for rings of {req} and {resp} bytes; this daemon allows at most "
                    f"{self.config.max_ring} per ring (max_ring in its config)", fatal=True)
            if not self.sessions.acquire():
                raise ResourceError(
                    f"the daemon already serves max_sessions={self.config.max_sessions} "
                    "sessions; close idle clients or raise max_sessions", fatal=True)
            counted = True
            names = SessionNames.new()
            seg = Segment.create(names, req, resp, owner_uid=self.peer.uid)
            self.session = Session(names.session, seg, self.registry, self.executor,
                                   self._fatal, spin=self.config.spin_us / 1e6)
            welcome = Welcome(version=version, session=names.session,
                              semaphores=list(names.semaphores),
                              segment_size=seg.header.segment_size, request_ring=req,
                              response_ring=resp, max_frame=MAX_FRAME,
                              daemon=f"tensord {__version__}")
            with self._send_lock:
                send_frame_with_fd(self.sock, welcome, seg.fd)
            seg.close_fd()  # the client holds its own descriptor now
            attached = read_frame(self.sock, deadline)
            if not isinstance(attached, Attached):
                raise ProtocolError(f"expected attached, got {type(attached).TYPE}", fatal=True)
            names.unlink()  # from here on nothing of the session is visible in /dev/shm
            names = None
            self.sock.settimeout(None)
            self.send(Ready())
            self.session.start()
            log.info("session %s: %r pid %d uid %d, rings %d/%d bytes", self.session.id[:8],
                     hello.client[:128], self.peer.pid, self.peer.uid, req, resp)
            self._serve_control()
        except TimeoutError:
            if self.session is None:
                with contextlib.suppress(OSError):
                    self.send(error_message(ProtocolError(
                        f"the handshake did not complete within {HANDSHAKE_TIMEOUT:.0f} s",
                        fatal=True)))
        except (PeerClosed, ConnectionError) as e:
            if not self._closed.is_set():
                log.debug("connection ended: %s", e)
        except OSError as e:
            # Not the socket: the session could not be set up (mmap, fallocate, semaphores).
            log.warning("connection of pid %d: %s", self.peer.pid, e)
            if self.session is None:
                with contextlib.suppress(OSError):
                    self.send(error_message(ResourceError(
                        f"the daemon could not set up the session: {e}", fatal=True)))
        except TensordError as e:
            if self.session is None:
                e.fatal = True  # every handshake failure ends the connection
            log.info("closing connection of pid %d: %s", self.peer.pid, e)
            with contextlib.suppress(OSError):
                self.send(error_message(e))
        except Exception as e:  # a daemon bug ends this connection only, with a reason
            log.exception("connection of pid %d failed", self.peer.pid)
            with contextlib.suppress(OSError):
                self.send(error_message(InternalError(
                    f"the daemon failed serving this connection: {type(e).__name__}: {e}",
                    fatal=True)))
        finally:
            if names is not None:
                names.unlink()
            if self.session is not None:
                self.session.stop()
                log.info("session %s closed after %d requests", self.session.id[:8],
                         self.session.served)
            if counted:
                self.sessions.release()
            with contextlib.suppress(OSError):
                self.sock.close()

    def _serve_control(self) -> None:
        while True:
            try:
                msg = read_frame(self.sock)
            except ProtocolError as e:
                if e.fatal:
                    raise
                self.send(error_message(e, getattr(e, "request_id", 0)))
                continue
            if isinstance(msg, Ping):
                self.send(Pong(id=msg.id))
            elif isinstance(msg, Models):
                self.send(ModelList(id=msg.id, models=self.registry.infos()))
            elif isinstance(msg, Goodbye):
                return
            elif isinstance(msg, (Load, Unload, Reload)):
                self._admin(msg)
            else:
                self.send(error_message(ProtocolError(
                    f"{type(msg).TYPE} is not a message a client sends after the handshake",
                    code=ErrorCode.BAD_MESSAGE), getattr(msg, "id", 0)))

    def _admin(self, msg) -> None:
        if self.peer.uid not in self.config.admin_uids:
            self.send(error_message(PermissionDeniedError(
                f"{msg.TYPE} is an admin message; uid {self.peer.uid} is not in the daemon's "
                "admin_uids (set [daemon] admin_uids in its config)"), msg.id))
            return
        try:
            if isinstance(msg, Load):
                self.control.load(msg.name, msg.config)
            elif isinstance(msg, Reload):
                self.control.reload(msg.name)
            else:
                self.control.unload(msg.name)
        except TensordError as e:
            self.send(error_message(e, msg.id))
            return
        self.send(Ok(id=msg.id))

    def _fatal(self, err: TensordError) -> None:
        """Called from the session thread: tell the client why, then end the connection."""
        err.fatal = True
        with contextlib.suppress(OSError):
            self.send(error_message(err))
        self.close()

    def close(self, reason: str | None = None) -> None:
        self._closed.set()
        # Say goodbye only if no other send is stuck on a client that does not read.
        if reason and self._send_lock.acquire(timeout=1.0):
            try:
                with contextlib.suppress(OSError):
                    self.sock.sendall(encode_frame(Goodbye(reason=reason)))
            finally:
                self._send_lock.release()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


def _choose_version(hello: Hello) -> int:
    common = [v for v in SUPPORTED_VERSIONS if hello.min_version <= v <= hello.max_version]
    if not common:
        raise VersionError(
            f"client speaks protocol versions {hello.min_version}..{hello.max_version}, this "
            f"daemon speaks {list(SUPPORTED_VERSIONS)}: upgrade the older side", fatal=True)
    return max(common)


class SessionCounter:
    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self.count >= self.limit:
                return False
            self.count += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.count -= 1
