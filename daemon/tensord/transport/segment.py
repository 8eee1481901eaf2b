"""The per-session shared-memory segment and its four semaphores (SPEC §3, §4.1)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import re
import secrets
from dataclasses import dataclass

import posix_ipc

from ..contract.errors import PermissionDeniedError, ProtocolError, ResourceError
from ..contract.layout import (
    HEADER_SIZE,
    KIND_REQUEST,
    KIND_RESPONSE,
    LAYOUT_VERSION,
    REQ_CONTROL,
    RESP_CONTROL,
    read_header,
    segment_size,
    write_header,
)
from .ring import RingConsumer, RingControl, RingProducer

SHM_DIR = "/dev/shm"
SEM_SUFFIXES = ("-rd", "-rs", "-pd", "-ps")
SEM_REQ_DATA, SEM_REQ_SPACE, SEM_RESP_DATA, SEM_RESP_SPACE = range(4)
_NAME_RE = re.compile(r"^(?:sem\.)?tensord-(\d+)-[0-9a-f]{32}(?:-(?:rd|rs|pd|ps))?$")


@dataclass(frozen=True)
class SessionNames:
    session: str
    semaphores: tuple[str, ...]

    @classmethod
    def new(cls, pid: int | None = None) -> SessionNames:
        session = secrets.token_hex(16)
        base = f"/tensord-{pid or os.getpid()}-{session}"
        return cls(session, tuple(base + s for s in SEM_SUFFIXES))

    def unlink(self) -> None:
        """Remove every name; already-removed ones are fine (unlink is idempotent here)."""
        for s in self.semaphores:
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_semaphore(s)


class Segment:
    """A mapped session segment: header, two ring control blocks, two rings, four semaphores.

    `side` is "daemon" or "client"; it decides which ring this process produces into.
    """

    def __init__(self, mm: mmap.mmap, sems: list[posix_ipc.Semaphore], side: str):
        self.fd = -1
        self.mm = mm
        self.buf = memoryview(mm)
        self.sems = sems
        h = read_header(self.buf)
        self.header = h
        head = self.buf[:HEADER_SIZE]
        self._head_view = head
        self.req_ctl = RingControl(head, REQ_CONTROL)
        self.resp_ctl = RingControl(head, RESP_CONTROL)
        if side == "daemon":
            self.requests = RingConsumer(self.req_ctl, h.request_ring_offset,
                                         h.request_ring_capacity, self.buf, KIND_REQUEST)
            self.responses = RingProducer(self.resp_ctl, h.response_ring_offset,
                                          h.response_ring_capacity, self.buf)
        else:
            self.requests = RingProducer(self.req_ctl, h.request_ring_offset,
                                         h.request_ring_capacity, self.buf)
            self.responses = RingConsumer(self.resp_ctl, h.response_ring_offset,
                                          h.response_ring_capacity, self.buf, KIND_RESPONSE)

    # -- creation (daemon) and attachment (client) ---------------------------------------

    @classmethod
    def create(cls, names: SessionNames, request_ring: int, response_ring: int,
               owner_uid: int | None = None) -> Segment:
        """Create, reserve, initialise and seal the segment, and create the semaphores. On any
        failure every name created so far is removed again.

        The segment is a memfd sealed against shrinking and growing: the client receives a
        writable descriptor of it (SCM_RIGHTS), and without the seals it could ftruncate the
        memory under the daemon's feet, which would kill the daemon with SIGBUS."""
        size = segment_size(request_ring, response_ring)
        fd = -1
        try:
            check_memory(size)
            fd = os.memfd_create(f"tensord-{names.session}",
                                 os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                    raise ResourceError(_no_memory_message(size), fatal=True) from None
                raise
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            mm = mmap.mmap(fd, size)
            write_header(memoryview(mm), request_ring, response_ring)
            sems = []
            for name in names.semaphores:
                sems.append(posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600,
                                                initial_value=0))
                if owner_uid is not None and owner_uid != os.getuid():
                    _give(os.path.join(SHM_DIR, "sem." + name.lstrip("/")), owner_uid)
        except BaseException:
            names.unlink()
            if fd >= 0:
                os.close(fd)
            raise
        seg = cls(mm, sems, "daemon")
        seg.fd = fd
        return seg

    @classmethod
    def attach(cls, fd: int, names: SessionNames, size: int, request_ring: int,
               response_ring: int) -> Segment:
        """Map the segment whose descriptor came with the welcome (client side), check its
        header, and open the semaphores. Takes ownership of `fd` (closes it)."""
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise ProtocolError(f"segment is {actual} bytes, welcome said {size}",
                                    fatal=True)
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        try:
            h = read_header(memoryview(mm))
        except ValueError as e:
            mm.close()
            raise ProtocolError(str(e), fatal=True) from None
        want = (LAYOUT_VERSION, HEADER_SIZE, size, HEADER_SIZE, request_ring,
                HEADER_SIZE + request_ring, response_ring)
        if (h.layout_version, h.header_size, h.segment_size, h.request_ring_offset,
                h.request_ring_capacity, h.response_ring_offset,
                h.response_ring_capacity) != want:
            mm.close()
            raise ProtocolError(f"segment header {h} does not match the welcome message",
                                fatal=True)
        sems = [posix_ipc.Semaphore(n) for n in names.semaphores]
        return cls(mm, sems, "client")

    def close_fd(self) -> None:
        """The daemon drops its descriptor once the client has its own."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def address(self) -> int:
        """The mapping's virtual address (for cudaHostRegister)."""
        anchor = ctypes.c_char.from_buffer(self.mm)
        try:
            return ctypes.addressof(anchor)
        finally:
            del anchor  # from_buffer holds an export of the mmap; drop it at once

    def close(self) -> bool:
        """Close semaphores and unmap. Returns False when tensors still view the mapping (the
        mapping is then freed by the garbage collector once they are gone)."""
        self.close_fd()
        for s in self.sems:
            with contextlib.suppress(posix_ipc.ExistentialError):
                s.close()
        self.sems = []
        self.req_ctl.release()
        self.resp_ctl.release()
        try:
            self._head_view.release()
            self.buf.release()
            self.mm.close()
        except BufferError:
            return False
        return True


def available_memory() -> tuple[int, str]:
    """Bytes the daemon can still allocate, and what limits it: the smaller of the host's
    MemAvailable and the daemon's cgroup (v2) memory.max minus memory.current."""
    best, why = 1 << 62, "no limit found"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    best, why = int(line.split()[1]) * 1024, "the host's available memory"
    except OSError:
        pass
    try:
        with open("/proc/self/cgroup") as f:
            rel = f.read().strip().split("::", 1)[-1]
        base = os.path.join("/sys/fs/cgroup", rel.lstrip("/"))
        with open(os.path.join(base, "memory.max")) as f:
            limit = f.read().strip()
        if limit != "max":
            with open(os.path.join(base, "memory.current")) as f:
                left = int(limit) - int(f.read())
            if left < best:
                best, why = left, "the daemon's cgroup memory limit"
    except (OSError, ValueError):
        pass
    return best, why


def check_memory(size: int) -> None:
    """Fail the handshake with a clear message instead of letting a segment that does not fit
    push the daemon into the OOM killer (segment memory is charged to the daemon)."""
    free, why = available_memory()
    if size > free:
        raise ResourceError(_no_memory_message(size, free, why), fatal=True)


def _no_memory_message(size: int, free: int | None = None, why: str = "") -> str:
    if free is None:
        free, why = available_memory()
    mib = 1 << 20
    return (f"the session needs {size // mib} MiB of shared memory but {why} leaves "
            f"{max(free, 0) // mib} MiB: ask for smaller rings (Go: WithRingSize), close idle "
            "sessions, or give the daemon more memory (e.g. MemoryMax= in its systemd unit, "
            "the container's memory limit)")


def _give(path: str, uid: int) -> None:
    try:
        os.chown(path, uid, -1)
    except PermissionError:
        raise PermissionDeniedError(
            f"the daemon (uid {os.getuid()}) cannot give its semaphores to a client running as "
            f"uid {uid}: run the client as the daemon's user, or give the daemon CAP_CHOWN",
            fatal=True,
        ) from None


def sweep_stale(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink tensord entries whose creating daemon is dead (a daemon killed mid-handshake)."""
    removed = []
    try:
        entries = os.listdir(shm_dir)
    except FileNotFoundError:
        return removed
    for e in entries:
        m = _NAME_RE.match(e)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(shm_dir, e))
            removed.append(e)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
