"""The per-session shared-memory segment and its four eventfds (SPEC §3, §4.1, §4.5)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import stat

from ..contract.errors import ProtocolError, ResourceError
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
from .ring import RingConsumer, RingControl, RingProducer, Shm

# Indexes into Segment.efds, in the order of the welcome's descriptors 1-4 (SPEC §2.4).
EFD_REQ_DATA, EFD_REQ_SPACE, EFD_RESP_DATA, EFD_RESP_SPACE = range(4)


class Segment:
    """A mapped session segment: header, two ring control blocks, two rings, four eventfds.

    `side` is "daemon" or "client"; it decides which ring this process produces into.
    """

    def __init__(self, mm: mmap.mmap, efds: list[int], side: str):
        self.fd = -1
        # Daemon side: called with the segment at the end of its session when the client
        # still holds unreleased responses (control/lingering.py keeps it counted until they
        # are gone) instead of unmapping it; None: close at once.
        self.on_linger = None
        self.lingering = False
        self.side = side
        self.mm = mm
        self.buf = memoryview(mm)
        self.efds = efds
        self.own_efds = True  # close() closes them; see close_efds
        self.shm = Shm(mm)
        h = read_header(self.buf)
        self.header = h
        self.req_ctl = RingControl(self.shm, REQ_CONTROL)
        self.resp_ctl = RingControl(self.shm, RESP_CONTROL)
        if side == "daemon":
            self.requests = RingConsumer(self.req_ctl, h.request_ring_offset,
                                         h.request_ring_capacity, KIND_REQUEST)
            self.responses = RingProducer(self.resp_ctl, h.response_ring_offset,
                                          h.response_ring_capacity)
        else:
            self.requests = RingProducer(self.req_ctl, h.request_ring_offset,
                                         h.request_ring_capacity)
            self.responses = RingConsumer(self.resp_ctl, h.response_ring_offset,
                                          h.response_ring_capacity, KIND_RESPONSE)

    # -- creation (daemon) and attachment (client) ---------------------------------------

    @classmethod
    def create(cls, session: str, request_ring: int, response_ring: int,
               reserved: int = 0) -> Segment:
        """Create, reserve, initialise and seal the segment, and create the eventfds; on any
        failure everything created so far is closed again (nothing has a name to leak).
        `reserved`: bytes promised to other sessions that are not allocated yet (see
        check_memory).

        The segment is a memfd sealed against shrinking and growing: the client receives a
        writable descriptor of it (SCM_RIGHTS), and without the seals it could ftruncate the
        memory under the daemon's feet, which would kill the daemon with SIGBUS."""
        size = segment_size(request_ring, response_ring)
        fd = -1
        efds: list[int] = []
        try:
            check_memory(size, reserved)
            fd = os.memfd_create(f"tensord-{session}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
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
            for _ in range(4):
                # Counter mode: one read takes every pending post. Non-blocking, since the
                # flag belongs to the file description both processes share (SPEC §4.5).
                efds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        except BaseException:
            for e in efds:
                os.close(e)
            if fd >= 0:
                os.close(fd)
            raise
        seg = cls(mm, efds, "daemon")
        seg.fd = fd
        return seg

    def descriptors(self) -> list[int]:
        """What the welcome carries (SPEC §2.4): the segment, then the four eventfds."""
        return [self.fd, *self.efds]

    @classmethod
    def attach(cls, fds: list[int], size: int, request_ring: int,
               response_ring: int) -> Segment:
        """Map the segment whose descriptors came with the welcome (client side), check them
        and the header. Takes ownership of every descriptor: the segment's is closed once
        mapped, the eventfds live as long as the Segment; on failure all are closed."""
        mm = None
        try:
            if len(fds) != 5:
                raise ProtocolError(f"the welcome came with {len(fds)} file descriptors, want 5 "
                                    "(the segment and four eventfds)", fatal=True)
            fd, efds = fds[0], fds[1:]
            actual = os.fstat(fd).st_size
            if actual != size or not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ProtocolError(f"segment is {actual} bytes, welcome said {size}",
                                    fatal=True)
            for e in efds:
                if os.readlink(f"/proc/self/fd/{e}") != "anon_inode:[eventfd]":
                    raise ProtocolError("a wake-up descriptor of the welcome is not an eventfd",
                                        fatal=True)
                # SPEC §2.4 MUST: a blocking one would hang whoever drains it with no post
                # pending, and O_NONBLOCK is shared with the daemon, so it is not ours to set.
                if not fcntl.fcntl(e, fcntl.F_GETFL) & os.O_NONBLOCK:
                    raise ProtocolError("a wake-up eventfd of the welcome is blocking; SPEC "
                                        "§2.4 says they are O_NONBLOCK (a daemon bug: upgrade "
                                        "it)", fatal=True)
            mm = mmap.mmap(fd, size)
            h = read_header(memoryview(mm))
            want = (LAYOUT_VERSION, HEADER_SIZE, size, HEADER_SIZE, request_ring,
                    HEADER_SIZE + request_ring, response_ring)
            if (h.layout_version, h.header_size, h.segment_size, h.request_ring_offset,
                    h.request_ring_capacity, h.response_ring_offset,
                    h.response_ring_capacity) != want:
                raise ProtocolError(f"segment header {h} does not match the welcome message",
                                    fatal=True)
            seg = cls(mm, list(efds), "client")
        except ValueError as e:  # read_header's complaints
            if mm is not None:
                mm.close()
            for f in fds:
                os.close(f)
            raise ProtocolError(str(e), fatal=True) from None
        except BaseException:
            if mm is not None:
                mm.close()
            for f in fds:
                os.close(f)
            raise
        os.close(fds[0])
        return seg

    def close_efds(self) -> None:
        """Close the four eventfds. The daemon's dispatcher does this itself for the sessions
        it serves (own_efds False), once it can hold no stale event of them."""
        for e in self.efds:
            with contextlib.suppress(OSError):
                os.close(e)
        self.efds = []

    def close_fd(self) -> None:
        """The daemon drops its segment descriptor once the client has its own."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _unreleased(self) -> list[tuple[int, int]]:
        """Segment offsets [start, end), page-rounded, of the response records the client has
        not released (from its head to the daemon's tail)."""
        h = self.header
        cap, base = h.response_ring_capacity, h.response_ring_offset
        tail = self.resp_ctl.tail()
        head = self.resp_ctl.head()  # the client's word: only trusted when it is possible
        if not (tail - cap <= head < tail and head % 64 == 0):
            return []
        first, last = head % cap, (tail - 1) % cap
        spans = [(first, last + 1)] if first <= last else [(first, cap), (0, last + 1)]
        return [(base + (a // PAGE) * PAGE, base + -(-b // PAGE) * PAGE) for a, b in spans]

    def release_memory(self, everything: bool = False) -> int:
        """Punch the segment's pages out (madvise MADV_REMOVE on the shared mapping, which is
        fallocate's PUNCH_HOLE for a memfd), except the response records the client has not
        released yet: it may still read them (SPEC §2.5: views stay valid until released).
        Everything else is of no use to anyone once the session has ended. Returns the bytes
        of pages still kept for the client (see `held`). A client that touches the pages
        again afterwards is charged for them itself (its own memory cgroup), never the
        daemon. `everything`: the client is gone, punch the records too."""
        h = self.header
        keep = [] if everything else self._unreleased()
        start = HEADER_SIZE
        for a, b in sorted(keep) + [(h.segment_size, h.segment_size)]:
            if a > start:
                try:
                    self.mm.madvise(mmap.MADV_REMOVE, start, a - start)
                except OSError:  # not shmem (a test's anonymous map): nothing to give back
                    return 0
            start = max(start, b)
        return sum(b - a for a, b in keep)

    def linger(self) -> int:
        """Session over (daemon side): punch what nobody needs, close the descriptors, and
        keep the mapping only when the client still holds unreleased responses. Returns the
        bytes kept for it (0: the segment is closed like close() does); the caller counts
        them against the client's uid, calls release_memory() again as the client releases
        records, and close() once they are gone."""
        kept = self.release_memory()
        if not kept:
            return 0
        self.close_fd()
        if self.own_efds:  # else the dispatcher closes them (it may hold stale events)
            self.close_efds()
        return kept

    def address(self) -> int:
        """The mapping's virtual address (for cudaHostRegister)."""
        anchor = ctypes.c_char.from_buffer(self.mm)
        try:
            return ctypes.addressof(anchor)
        finally:
            del anchor  # from_buffer holds an export of the mmap; drop it at once

    def close(self) -> bool:
        """Close the eventfds and unmap. Returns False when tensors still view the mapping
        (the mapping is then freed by the garbage collector once they are gone).

        The daemon first gives the segment's pages back (release_memory): a client may keep
        its descriptor or mapping after the session, and must not keep the daemon's memory
        with it. What it has not released stays (its views stay valid) and, with on_linger
        set, stays counted against it (issue 19.3): the segment is handed to on_linger
        mapped, and its second close() punches everything and unmaps."""
        if self.side == "daemon" and not self.shm.closed:
            if self.on_linger is not None and not self.lingering:
                kept = self.linger()
                if kept:
                    self.lingering = True
                    self.on_linger(self, kept)
                    return True
            else:
                self.release_memory(everything=self.lingering)
        self.close_fd()
        if self.own_efds:
            self.close_efds()
        self.shm.close()
        try:
            self.buf.release()
            self.mm.close()
        except BufferError:
            return False
        return True


PAGE = mmap.PAGESIZE
NO_LIMIT = 1 << 62  # cgroup v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages)
CGROUP_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes")
CGROUP_V2 = ("memory.max", "memory.current")


def available_memory(proc_cgroup: str = "/proc/self/cgroup",
                     cgroup_root: str = "/sys/fs/cgroup",
                     meminfo: str = "/proc/meminfo") -> tuple[int, str]:
    """Bytes the daemon can still allocate, and what limits it: the host's MemAvailable, or
    less when the daemon's memory cgroup or one of its ancestors is limited (v2: memory.max
    minus memory.current; v1, the memory controller's own hierarchy: memory.limit_in_bytes
    minus memory.usage_in_bytes). The arguments are for tests."""
    best, why = NO_LIMIT, "no limit found"
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    best, why = int(line.split()[1]) * 1024, "the host's available memory"
    except (OSError, ValueError):
        pass
    left = _cgroup_left(proc_cgroup, cgroup_root)
    if left is not None and left < best:
        best, why = left, "the daemon's cgroup memory limit"
    return best, why


def _cgroup_left(proc_cgroup: str, root: str) -> int | None:
    """The least headroom of the daemon's memory cgroup and its ancestors; None: no limit."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    dirs: list[tuple[str, str, tuple[str, str]]] = []  # (hierarchy top, leaf, files)
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            tops = [(os.path.join(root, "memory"), CGROUP_V1)]
        elif controllers == "":  # v2 (a hybrid host mounts it under unified/)
            tops = [(root, CGROUP_V2), (os.path.join(root, "unified"), CGROUP_V2)]
        else:
            continue
        rel = path.strip("/")
        dirs += [(top, os.path.join(top, rel) if rel else top, files) for top, files in tops]
    best: int | None = None
    for top, leaf, (limit_file, usage_file) in dirs:
        d = leaf
        while True:  # a limit on an ancestor binds the daemon too
            left = _headroom(d, limit_file, usage_file)
            if left is not None and (best is None or left < best):
                best = left
            if d == top or len(d) <= len(top):
                break
            d = os.path.dirname(d)
    return best


def _headroom(d: str, limit_file: str, usage_file: str) -> int | None:
    try:
        with open(os.path.join(d, limit_file)) as f:
            limit = f.read().strip()
        if limit == "max" or int(limit) >= NO_LIMIT:
            return None
        with open(os.path.join(d, usage_file)) as f:
            return int(limit) - int(f.read())
    except (OSError, ValueError):
        return None


def check_memory(size: int, reserved: int = 0) -> None:
    """Fail the handshake with a clear message instead of letting a segment that does not fit
    push the daemon into the OOM killer (segment memory is charged to the daemon). `reserved`:
    bytes admitted for other sessions that the kernel has not charged yet."""
    free, why = available_memory()
    free -= reserved
    if size > free:
        err = ResourceError(_no_memory_message(size, free, why), fatal=True)
        err.reason = "host_memory"  # what metrics count the refusal as
        raise err


def _no_memory_message(size: int, free: int | None = None, why: str = "") -> str:
    if free is None:
        free, why = available_memory()
    mib = 1 << 20
    return (f"the session needs {size // mib} MiB of shared memory but {why} leaves "
            f"{max(free, 0) // mib} MiB: ask for smaller rings (Go: WithRingSize), close idle "
            "sessions, or give the daemon more memory (e.g. MemoryMax= in its systemd unit, "
            "the container's memory limit)")
