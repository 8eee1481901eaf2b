"""The daemon's CPU per request, measured in-process: the serving core (tensord._core) with
the built-in models, one session whose client side lives in this process. No socket, no
second process, no wake-up latency: what is measured is the CPU the daemon's own threads
spend per request.

Each round publishes `--burst` requests into the request ring, posts the request-data
eventfd once, and reads the responses back. The dispatcher's thread (intake, identity, error
answers) and the model workers' threads (gather, forward pass, split) are timed by the
kernel's per-thread CPU clock (/proc/self/task/TID/schedstat); the figure per round is their
CPU time divided by the round's requests, reported as p50 / mean / p99 over rounds.

    .venv/bin/python bench/profile_daemon.py [--n 20000] [--burst 64] [--json]

This file only drives the daemon's classes; it changes none of them."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from tensord.contract.descriptors import RequestDescriptor, TensorRef, encode_descriptor
from tensord.contract.layout import KIND_REQUEST
from tensord.models.builtin import builtin_models
from tensord.models.registry import Registry
from tensord.serving.core import Serving
from tensord.serving.executor import Executor
from tensord.transport import records
from tensord.transport.segment import EFD_REQ_DATA, Segment

RING = 1 << 22


def thread_cpu_ns(prefixes: tuple[str, ...]) -> int:
    """CPU nanoseconds of this process's threads whose names start with one of prefixes."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            if name.startswith(prefixes):
                with open(f"/proc/self/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


class Pair:
    """A session served by the core, and its client side in this process."""

    def __init__(self, serving: Serving):
        self.seg = Segment.create("bench-hotpath", RING, RING)
        fds = [os.dup(self.seg.fd), *(os.dup(e) for e in self.seg.efds)]
        self.cli = Segment.attach(fds, self.seg.header.segment_size, RING, RING)
        self.handle = serving.add_session("hotpath0", self.seg, os.getuid(), False, 1 << 26,
                                          self._fatal, lambda: None)
        self.seg.close_fd()
        self.rid = 0

    @staticmethod
    def _fatal(e) -> None:
        raise RuntimeError(f"session ended: {e}")

    @staticmethod
    def request(model: str, x: torch.Tensor) -> tuple:
        n = x.numel() * x.element_size()

        def encode(offsets: list[int]) -> bytes:
            return encode_descriptor(RequestDescriptor(model=model, timeout_us=0, inputs=[
                TensorRef("x", "f32", list(x.shape), offsets[0], n)]))

        record_len, desc, offsets = records.plan([n], encode)
        return record_len, desc, [(offsets[0], n, x)]

    def round(self, req: tuple, burst: int) -> None:
        record_len, desc, payloads = req
        for _ in range(burst):
            self.rid += 1
            off = self.cli.requests.try_reserve(record_len)
            assert off is not None, "request ring full"
            records.write(self.cli, off, KIND_REQUEST, self.rid, record_len, desc, payloads)
        self.cli.requests.publish()
        os.eventfd_write(self.cli.efds[EFD_REQ_DATA], 1)
        got = 0
        core = self.cli.responses.core
        end = time.monotonic() + 30
        while got < burst:
            recs = core.poll(1024)
            for r in recs:
                core.release(r[0])
            got += len(recs)
            if not recs:
                assert time.monotonic() < end, "no responses"
                time.sleep(0)

    def close(self) -> None:
        self.handle.end()
        self.cli.close()


def run(pair: Pair, model: str, x: torch.Tensor, n: int, burst: int) -> list[int]:
    """Rounds of `burst` requests until n; per round the daemon's CPU ns per request."""
    req = pair.request(model, x)
    threads = ("dispatcher", "model-")
    out = []
    for _ in range(max(1, n // burst)):
        c0 = thread_cpu_ns(threads)
        pair.round(req, burst)
        time.sleep(0.001)  # the threads go back to sleep, so their clocks are settled
        out.append((thread_cpu_ns(threads) - c0) // burst)
    return out


def stats(xs: list[int]) -> dict:
    xs = sorted(xs)
    n = len(xs)
    return {"count": n, "p50_us": xs[n // 2] / 1e3, "mean_us": sum(xs) / n / 1e3,
            "p90_us": xs[n * 9 // 10] / 1e3, "p99_us": xs[min(n - 1, n * 99 // 100)] / 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="requests per case")
    ap.add_argument("--burst", type=int, default=64, help="requests per round")
    ap.add_argument("--json", action="store_true", help="JSON lines only (for run.py)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    executor = Executor()
    registry = Registry(executor.aside(builtin_models))
    serving = Serving(registry, executor)
    serving.start()
    cases = [("identity", "4 KiB f32", torch.arange(1024, dtype=torch.float32)),
             ("identity", "16 B f32", torch.arange(4, dtype=torch.float32)),
             ("mlp", "1 row (64 B f32)", torch.ones(1, 16))]
    rows = []
    pair = Pair(serving)
    try:
        for model, what, x in cases:
            run(pair, model, x, 10 * args.burst, args.burst)  # warm-up
            rows.append({"case": f"{model} {what}", "model": model,
                         **stats(run(pair, model, x, args.n, args.burst))})
    finally:
        pair.close()
        serving.stop()
    if args.json:
        for r in rows:
            print(json.dumps({"hotpath": r}))
        return 0
    print(f"daemon CPU per request, rounds of {args.burst} (µs):")
    for r in rows:
        print(f"  {r['case']:24} p50 {r['p50_us']:7.2f}  mean {r['mean_us']:7.2f}  "
              f"p99 {r['p99_us']:7.2f}  rounds={r['count']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
