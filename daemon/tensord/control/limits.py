"""What clients may hold of the daemon: sessions and their shared memory, in all and per uid.

Admission runs on the control loop, one handshake at a time, and a session's bytes are
counted from the moment it is admitted (before its memfd exists) until its memory is freed
(after its last running request), so concurrent handshakes can never together pass a budget
meant for fewer of them. Responses the serving core parks for clients that do not read them
count against the same limits (the core holds them to these limits itself; `parked_of`).
The host's and the cgroup's memory are checked too (transport/segment.py), less the bytes
admitted but not yet allocated by the kernel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import DEFAULT_SHARE, UID_SHARE, DaemonConfig
from ..contract.errors import ResourceError
from ..transport.segment import available_memory

MiB = 1 << 20


@dataclass
class Grant:
    """One admitted session: what it counts against the limits until released."""

    uid: int
    size: int
    charged: bool = False  # its pages exist (posix_fallocate done): the kernel counts them
    session: bool = True  # False: memory of an ended session (lingering.py), no session


@dataclass
class _Usage:
    sessions: int = 0
    memory: int = 0


@dataclass
class Admission:
    max_sessions: int
    max_sessions_per_uid: int = 0
    max_memory: int = 0
    max_memory_per_uid: int = 0
    sessions: int = 0
    memory: int = 0  # bytes of every admitted session's segment
    uncharged: int = 0  # of which the kernel has not allocated the pages yet
    control: int = 0  # control-only connections (no session, no memory): probes, admin
    _by_uid: dict[int, _Usage] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # The serving core's parked bytes: uid -> (the uid's, all sessions'); None: only ours.
    parked_of: Callable[[int], tuple[int, int]] | None = None

    @classmethod
    def from_config(cls, cfg: DaemonConfig) -> Admission:
        return cls(cfg.max_sessions, *per_uid_limits(cfg))

    def admit(self, uid: int, size: int) -> Grant:
        """Count a new session of `size` bytes for `uid`, or raise ResourceError (fatal) saying
        which limit it would pass; its `reason` names the limit (a metrics label)."""
        with self._lock:
            return self._admit(uid, size)

    def _admit(self, uid: int, size: int) -> Grant:
        u = self._by_uid.get(uid) or _Usage()
        uid_parked, parked = self.parked_of(uid) if self.parked_of else (0, 0)
        if self.sessions >= self.max_sessions:
            _refuse("sessions", f"the daemon already serves max_sessions={self.max_sessions} "
                    "sessions; close idle clients or raise max_sessions")
        if self.max_sessions_per_uid and u.sessions >= self.max_sessions_per_uid:
            _refuse("sessions_per_uid", f"uid {uid} already has {u.sessions} sessions "
                    f"(max_sessions_per_uid={self.max_sessions_per_uid}); share one client "
                    "between threads or goroutines, or close idle ones")
        if self.max_memory and self.memory + parked + size > self.max_memory:
            _refuse("memory", f"the session needs {_mib(size)} of shared memory, but sessions "
                    f"hold {_mib(self.memory + parked)} of max_memory="
                    f"{_mib(self.max_memory)}: ask for "
                    "smaller rings (Go: WithRingSize) or close idle sessions")
        if self.max_memory_per_uid and u.memory + uid_parked + size > self.max_memory_per_uid:
            _refuse("memory_per_uid", f"the session needs {_mib(size)} of shared memory, but "
                    f"uid {uid} holds {_mib(u.memory + uid_parked)} of max_memory_per_uid="
                    f"{_mib(self.max_memory_per_uid)}: ask for smaller rings (Go: "
                    "WithRingSize) or close idle sessions")
        u.sessions += 1
        u.memory += size
        self._by_uid[uid] = u
        self.sessions += 1
        self.memory += size
        self.uncharged += size
        return Grant(uid, size)

    def admit_control(self) -> None:
        """Count a control-only connection (SPEC hello `control_only`). They hold no session
        and no memory, so they do not compete with sessions: a probe still gets in when
        every session is taken. They are bounded apart, by max_sessions too, since each
        holds a descriptor and a place in the control loop."""
        with self._lock:
            if self.control >= self.max_sessions:
                _refuse("control", f"the daemon already has max_sessions={self.max_sessions} "
                        "control-only connections open (probes, admin): close idle ones")
            self.control += 1

    def release_control(self) -> None:
        with self._lock:
            self.control -= 1

    def charged(self, g: Grant) -> None:
        """The session's pages are allocated: the kernel's own counters include them now."""
        with self._lock:
            self._charged(g)

    def _charged(self, g: Grant) -> None:
        if not g.charged:
            g.charged = True
            self.uncharged -= g.size

    def hold(self, uid: int, size: int) -> Grant:
        """Count `size` bytes the kernel holds for `uid` without a session: unreleased
        responses of an ended session (lingering.py). Never refused (they exist already);
        they count against what the uid and the daemon may admit next."""
        with self._lock:
            u = self._by_uid.setdefault(uid, _Usage())
            u.memory += size
            self.memory += size
        return Grant(uid, size, charged=True, session=False)

    def resize(self, g: Grant, size: int) -> None:
        """A held grant shrank (the client released some of it)."""
        with self._lock:
            self.memory += size - g.size
            self._by_uid[g.uid].memory += size - g.size
            g.size = size

    def release(self, g: Grant) -> None:
        """The session's memory is gone (call once its segment is freed, not when its
        connection closes: requests still running keep it mapped), or a held grant's."""
        with self._lock:
            self._charged(g)
            self.memory -= g.size
            u = self._by_uid[g.uid]
            u.memory -= g.size
            if g.session:
                self.sessions -= 1
                u.sessions -= 1
            if not u.sessions and not u.memory:
                del self._by_uid[g.uid]

    def of_uid(self, uid: int) -> tuple[int, int]:
        """(sessions, bytes) the uid holds: ring bytes and parked responses."""
        with self._lock:
            u = self._by_uid.get(uid)
            parked = self.parked_of(uid)[0] if self.parked_of else 0
            return (u.sessions, u.memory + parked) if u else (0, 0)


def per_uid_limits(cfg: DaemonConfig) -> tuple[int, int, int]:
    """(max_sessions_per_uid, max_memory, max_memory_per_uid) with the defaults filled in:
    what a uid may hold when the config does not say is a quarter of the whole (sessions:
    of max_sessions; memory: of max_memory, or when that is 0 of the memory the daemon has
    now), so one service that leaks sessions or memory leaves room for three others."""
    sessions = cfg.max_sessions_per_uid
    if sessions == DEFAULT_SHARE:
        sessions = max(1, cfg.max_sessions // UID_SHARE)
    memory = cfg.max_memory_per_uid
    if memory == DEFAULT_SHARE:
        whole = cfg.max_memory or available_memory()[0]
        memory = max(MiB, whole // UID_SHARE)
    return sessions, cfg.max_memory, memory


def _refuse(reason: str, message: str):
    err = ResourceError(message, fatal=True)
    err.reason = reason
    raise err


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n % MiB else f"{n // MiB} MiB"
