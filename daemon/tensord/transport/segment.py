"""The per-session shared-memory segment and its four semaphores (SPEC §3, §4.1)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
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
    shm: str
    semaphores: tuple[str, ...]

    @classmethod
    def new(cls, pid: int | None = None) -> SessionNames:
        session = secrets.token_hex(16)
        shm = f"/tensord-{pid or os.getpid()}-{session}"
        return cls(session, shm, tuple(shm + s for s in SEM_SUFFIXES))

    def unlink(self) -> None:
        """Remove every name; already-removed ones are fine (unlink is idempotent here)."""
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(self.shm)
        for s in self.semaphores:
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_semaphore(s)


class Segment:
    """A mapped session segment: header, two ring control blocks, two rings, four semaphores.

    `side` is "daemon" or "client"; it decides which ring this process produces into.
    """

    def __init__(self, mm: mmap.mmap, sems: list[posix_ipc.Semaphore], side: str):
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
        """Create, reserve and initialise the segment and semaphores. On any failure every
        name created so far is removed again."""
        size = segment_size(request_ring, response_ring)
        try:
            _check_free_space(size)
            shm = posix_ipc.SharedMemory(names.shm, posix_ipc.O_CREX, mode=0o600)
            try:
                try:
                    os.posix_fallocate(shm.fd, 0, size)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.ENOMEM):
                        raise ResourceError(_no_space_message(size), fatal=True) from None
                    raise
                mm = mmap.mmap(shm.fd, size)
                if owner_uid is not None and owner_uid != os.getuid():
                    _give(shm.fd, None, owner_uid)
            finally:
                shm.close_fd()
            write_header(memoryview(mm), request_ring, response_ring)
            sems = []
            for name in names.semaphores:
                sems.append(posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600,
                                                initial_value=0))
                if owner_uid is not None and owner_uid != os.getuid():
                    _give(None, os.path.join(SHM_DIR, "sem." + name.lstrip("/")), owner_uid)
        except BaseException:
            names.unlink()
            raise
        return cls(mm, sems, "daemon")

    @classmethod
    def attach(cls, names: SessionNames, size: int, request_ring: int,
               response_ring: int) -> Segment:
        """Open a daemon-created segment (client side) and check its header."""
        shm = posix_ipc.SharedMemory(names.shm)
        try:
            actual = os.fstat(shm.fd).st_size
            if actual != size:
                raise ProtocolError(f"segment is {actual} bytes, welcome said {size}",
                                    fatal=True)
            mm = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
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


def _check_free_space(size: int) -> None:
    st = os.statvfs(SHM_DIR)
    free = st.f_bavail * st.f_frsize
    if free < size:
        raise ResourceError(_no_space_message(size, free), fatal=True)


def _no_space_message(size: int, free: int | None = None) -> str:
    if free is None:
        st = os.statvfs(SHM_DIR)
        free = st.f_bavail * st.f_frsize
    mib = 1 << 20
    want_gib = max(1, -(-2 * size // (1 << 30)))
    return (f"{SHM_DIR} has {free // mib} MiB free, the session needs {size // mib} MiB: run the "
            f"container with --shm-size={want_gib}g (Kubernetes: mount an emptyDir with medium "
            f"Memory on /dev/shm), or ask for smaller rings (Go: WithRingSize)")


def _give(fd: int | None, path: str | None, uid: int) -> None:
    try:
        if fd is not None:
            os.fchown(fd, uid, -1)
        else:
            os.chown(path, uid, -1)
    except PermissionError:
        raise PermissionDeniedError(
            f"the daemon (uid {os.getuid()}) cannot give shared memory to a client running as "
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
