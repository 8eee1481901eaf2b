"""A control-only connection to a running daemon (SPEC §2.4 hello `control_only`): what the
operator commands (`tensord health`, `status`, `stats`, `models`, `ping`) and exec probes use.

    with ControlClient() as c:
        ready = c.health().ready

It opens no session: the daemon creates no segment, no eventfds and logs nothing at INFO,
and a probe still gets in when every session is taken. It imports neither torch nor numpy
(the contract's messages and frames only), so a probe starts in tens of milliseconds.

A daemon that predates `control_only` ignores the key and makes a session anyway; this
client then closes the descriptors that came with the welcome without mapping anything,
and asked for the smallest rings so that such a daemon sets aside 2 x 64 KiB, not 2 x 16 MiB.
"""

from __future__ import annotations

import itertools
import os

from .config import default_socket_path
from .contract.errors import (
    ConnectionClosedError,
    ProtocolError,
    error_from_code,
)
from .contract.frames import PeerClosed, encode_frame, read_frame, read_frame_with_fds
from .contract.messages import (
    PROTOCOL_VERSION,
    Attached,
    Draining,
    Error,
    Goodbye,
    Health,
    HealthReport,
    Hello,
    ModelInfo,
    ModelList,
    Models,
    ModelStat,
    ModelStats,
    Ping,
    Pong,
    Ready,
    Stats,
    Welcome,
)
from .unixsock import connect_daemon

MIN_RING = 65536  # SPEC §3.2: what an older daemon makes when it ignores control_only


class ControlClient:
    """One control-only connection; calls are synchronous, one at a time."""

    def __init__(self, path: str | None = None, *, name: str = "tensord-control",
                 timeout: float = 10.0):
        self.path = path or default_socket_path()
        self.sock = connect_daemon(self.path, timeout, "TENSORD_SOCKET (or --socket)")
        self._ids = itertools.count(1)
        self.session = False  # an older daemon made a session anyway
        try:
            self._handshake(name)
        except (TimeoutError, PeerClosed, ConnectionError) as e:
            self.sock.close()
            what = (f"did not answer within {timeout:g} s" if isinstance(e, TimeoutError)
                    else "closed the connection")
            raise ConnectionClosedError(f"the daemon at {self.path} {what} during the "
                                        "handshake") from None
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self, name: str) -> None:
        self.sock.sendall(encode_frame(Hello(
            min_version=PROTOCOL_VERSION, max_version=PROTOCOL_VERSION, client=name,
            request_ring=MIN_RING, response_ring=MIN_RING, control_only=True)))
        welcome, fds = read_frame_with_fds(self.sock)
        for fd in fds:  # never mapped: nothing of a session is used here
            os.close(fd)
        if isinstance(welcome, Error):
            raise error_from_code(welcome.code, welcome.message, fatal=welcome.fatal)
        if not isinstance(welcome, Welcome):
            raise ProtocolError(f"expected a welcome, the daemon sent {type(welcome).TYPE}",
                                fatal=True)
        if fds and len(fds) != 5 or not fds and welcome.segment_size != 0:
            raise ProtocolError(f"a welcome with {len(fds)} descriptors and segment_size "
                                f"{welcome.segment_size}: neither a session nor a control-only "
                                "connection", fatal=True)
        self.session = bool(fds)
        self.welcome = welcome
        self.sock.sendall(encode_frame(Attached()))
        self._reply(Ready)

    def _reply(self, cls, rid: int | None = None):
        while True:
            msg = read_frame(self.sock)
            if isinstance(msg, Draining):  # an older daemon's session: nothing to finish
                continue
            if isinstance(msg, Goodbye):
                raise ConnectionClosedError(f"the daemon said goodbye: {msg.reason}")
            if isinstance(msg, Error):
                raise error_from_code(msg.code, msg.message, fatal=msg.fatal)
            if not isinstance(msg, cls) or rid is not None and msg.id != rid:
                raise ProtocolError(f"expected {cls.TYPE}, the daemon sent {type(msg).TYPE}",
                                    fatal=True)
            return msg

    def _call(self, msg_type, reply_type):
        rid = next(self._ids)
        try:
            self.sock.sendall(encode_frame(msg_type(id=rid)))
            return self._reply(reply_type, rid)
        except TimeoutError:
            raise ConnectionClosedError(f"the daemon at {self.path} did not answer "
                                        f"{msg_type.TYPE} in time") from None
        except (PeerClosed, ConnectionError):
            raise ConnectionClosedError(f"the daemon at {self.path} closed the "
                                        "connection") from None

    def ping(self) -> None:
        self._call(Ping, Pong)

    def models(self) -> list[ModelInfo]:
        reply: ModelList = self._call(Models, ModelList)
        return reply.models

    def stats(self) -> list[ModelStat]:
        reply: ModelStats = self._call(Stats, ModelStats)
        return reply.models

    def health(self) -> HealthReport:
        return self._call(Health, HealthReport)

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        try:
            self.sock.sendall(encode_frame(Goodbye(reason="client closed")))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
