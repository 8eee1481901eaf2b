"""Python side of the floors (started by `loadgen floor-sem` / `loadgen floor-spin`).

sem:  waits on semaphore A (posix_ipc, as the daemon does) and posts B, until A stays silent
      for --idle seconds or --max rounds are done. The blocking floor: a Go<->Python
      round trip through two named semaphores and nothing else.
spin: busy-polls a u64 `ping` at offset 0 of a shared-memory file and answers by storing it
      into `pong` at offset 64 (another cache line). The spinning floor.

Prints READY once it has opened everything, so the Go side can unlink the names."""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time

import posix_ipc


def sem_peer(a_name: str, b_name: str, idle: float, max_rounds: int) -> int:
    a = posix_ipc.Semaphore(a_name)
    b = posix_ipc.Semaphore(b_name)
    print("READY", flush=True)
    n = 0
    try:
        while n < max_rounds:
            try:
                a.acquire(idle)
            except posix_ipc.BusyError:
                break
            b.release()
            n += 1
    finally:
        a.close()
        b.close()
    return n


def spin_peer(path: str, idle: float, max_rounds: int) -> int:
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, 4096)
    finally:
        os.close(fd)
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
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("sem")
    s.add_argument("a")
    s.add_argument("b")
    sp = sub.add_parser("spin")
    sp.add_argument("path")
    for x in (s, sp):
        x.add_argument("--idle", type=float, default=2.0)
        x.add_argument("--max", type=int, default=10_000_000)
    args = p.parse_args()
    if args.mode == "sem":
        n = sem_peer(args.a, args.b, args.idle, args.max)
    else:
        n = spin_peer(args.path, args.idle, args.max)
    print(f"floor_peer {args.mode}: {n} rounds", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
