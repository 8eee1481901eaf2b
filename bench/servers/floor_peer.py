"""Python side of the floors, started by `loadgen floors` with its descriptors as fds 3, 4.

eventfd: fd 3 is eventfd A, fd 4 eventfd B (both O_NONBLOCK, counter mode, as a session's).
         Sleeps in epoll on A exactly as the daemon's dispatcher does (select.epoll, GIL
         released), drains A with one read, and posts B through tensord's native ring core
         (`Shm.post`, the write(2) the daemon wakes a client with), until A stays silent for
         --idle seconds or --max rounds are done. The blocking floor: a Go<->Python round
         trip through two eventfds and nothing else.
spin:    fd 3 is a 4 KiB memfd. Busy-polls a u64 `ping` at offset 0 and answers by storing it
         into `pong` at offset 64 (another cache line). The spinning floor.

Prints READY once it is ready for the first round."""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import select
import sys
import time

FD_A, FD_B = 3, 4


def eventfd_peer(idle: float, max_rounds: int) -> int:
    try:
        from tensord.transport._ring import Shm
        shm = Shm(mmap.mmap(-1, 4096))

        def post(fd: int) -> None:
            shm.post(fd)
    except ImportError:  # the daemon's package not importable: the same write(2) from os
        def post(fd: int) -> None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(fd, 1)
    ep = select.epoll()
    ep.register(FD_A, select.EPOLLIN)
    read = os.read
    print("READY", flush=True)
    n = 0
    try:
        while n < max_rounds:
            try:
                events = ep.poll(idle)
            except InterruptedError:
                continue
            if not events:
                break
            with contextlib.suppress(BlockingIOError):  # as the dispatcher's _drain
                read(FD_A, 8)
            post(FD_B)
            n += 1
    finally:
        ep.close()
    return n


def spin_peer(idle: float, max_rounds: int) -> int:
    mm = mmap.mmap(FD_A, 4096)
    q = memoryview(mm).cast("Q")
    seen = q[0]  # before READY: the Go side sends its first ping once it reads READY
    print("READY", flush=True)
    n = 0
    idle_since = None
    monotonic = time.monotonic
    while n < max_rounds:
        for _ in range(4096):
            v = q[0]
            if v != seen:
                break
        else:
            # No ping for 4096 polls: look at the clock (rarely, to keep the poll loop tight).
            now = monotonic()
            if idle_since is None:
                idle_since = now
            elif now - idle_since > idle:
                break
            continue
        q[8] = v  # offset 64: pong, its own cache line
        seen = v
        n += 1
        idle_since = None
    q.release()
    mm.close()
    return n


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["eventfd", "spin"])
    p.add_argument("--idle", type=float, default=2.0)
    p.add_argument("--max", type=int, default=10_000_000)
    args = p.parse_args()
    if args.mode == "eventfd":
        n = eventfd_peer(args.idle, args.max)
    else:
        n = spin_peer(args.idle, args.max)
    print(f"floor_peer {args.mode}: {n} rounds", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
