"""The daemon's hot path per request, measured in-process: no socket, no second process, no
wake-up latency. A segment is created as the daemon creates it and attached as a client
attaches it; a reference-client-style producer writes request records into it, and each
record is taken and answered by tensord's own `Session` (serving/session.py) with the
built-in models, exactly as the dispatcher and the compute thread do it:

    session.take(16)          read + validate the record (native core), decode the
                              descriptor, check refs, order inputs, view the tensor
    session.execute(job)      run the model, plan the response, write + publish it, release
                              the request record, wake the client (its eventfd is posted:
                              the response ring's consumer_waiting is 1, as for a client
                              sleeping with blocking waits)

Only take + execute are timed (the producer's and consumer's work is not), one record per
round, and reported as µs per request (p50, mean). A second pass wraps each step of the
path with timers (each wrapper costs ~0.3 µs, so the steps add up to a little more than
the clean total) for the per-step table. `mlp` runs in this thread here (the daemon runs
it on its compute thread, one hand-off more).

    .venv/bin/python bench/profile_daemon.py [--n 20000] [--json]

This file only wraps the daemon's functions; it changes none of them."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections import defaultdict

import torch

from tensord.contract import descriptors
from tensord.contract.descriptors import RequestDescriptor, TensorRef, encode_descriptor
from tensord.contract.layout import KIND_REQUEST
from tensord.models.builtin import builtin_models
from tensord.models.registry import Registry
from tensord.models.signature import Signature
from tensord.serving import session as session_mod
from tensord.serving.executor import Executor
from tensord.serving.session import Session
from tensord.transport import records, ring, waiting
from tensord.transport.segment import EFD_RESP_DATA, Segment

RING = 1 << 20
# The client side uses these, never the timed wrappers patch() installs.
_write_record = records.write

samples: dict[str, list[int]] = defaultdict(list)


class Pair:
    """A daemon-side session and the client side of its segment, in this process."""

    def __init__(self, executor: Executor, registry: Registry):
        self.seg = Segment.create("bench-hotpath", RING, RING)
        fds = [os.dup(self.seg.fd), *(os.dup(e) for e in self.seg.efds)]
        self.cli = Segment.attach(fds, self.seg.header.segment_size, RING, RING)
        self.seg.close_fd()
        self.session = Session("hotpath-0000", self.seg, registry, executor, self._fatal)
        # A client asleep waiting for its response (blocking waits): the daemon posts pd.
        resp = self.cli.resp_ctl
        resp.set_flag(resp.consumer_waiting, 1)
        self.rid = 0

    @staticmethod
    def _fatal(e) -> None:
        raise RuntimeError(f"session ended: {e}")

    def request(self, model: str, x: torch.Tensor) -> tuple:
        n = x.numel() * x.element_size()

        def encode(offsets: list[int]) -> bytes:
            return encode_descriptor(RequestDescriptor(model=model, timeout_us=0, inputs=[
                TensorRef("x", "f32", list(x.shape), offsets[0], n)]))

        record_len, desc, offsets = records.plan([n], encode)
        return record_len, desc, [(offsets[0], n, x)]

    def publish(self, req: tuple) -> None:
        record_len, desc, payloads = req
        self.rid += 1
        off = self.cli.requests.try_reserve(record_len)
        assert off is not None, "request ring full"
        _write_record(self.cli, off, KIND_REQUEST, self.rid, record_len, desc, payloads)
        self.cli.requests.publish()

    def consume(self) -> None:
        core = self.cli.responses.core  # the native consumer: not the wrapped class
        got = core.poll(16)
        assert len(got) == 1 and got[0][2] == self.rid, got
        core.release(got[0][0])
        try:
            os.read(self.cli.efds[EFD_RESP_DATA], 8)  # the post the daemon made
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.session.end()
        self.cli.close()


def run(pair: Pair, model: str, x: torch.Tensor, n: int) -> list[int]:
    """n rounds; the ns of take + execute of each."""
    req = pair.request(model, x)
    s = pair.session
    perf = time.perf_counter_ns
    out = []
    for _ in range(n):
        pair.publish(req)
        t0 = perf()
        for job in s.take(16):
            s.execute(job)
        t1 = perf()
        pair.consume()
        out.append(t1 - t0)
    return out


def timed(name: str, fn):
    perf = time.perf_counter_ns

    @functools.wraps(fn)
    def wrapper(*a, **k):
        t0 = perf()
        try:
            return fn(*a, **k)
        finally:
            samples[name].append(perf() - t0)
    return wrapper


def patch() -> None:
    """Timers around the steps (module attributes session.py looks up at call time)."""
    S = session_mod.Session
    S.take = timed("take (whole)", S.take)
    ring.RingConsumer.poll = timed("  ring.poll (native: header checks)", ring.RingConsumer.poll)
    S._job = timed("  _job (per record)", S._job)
    session_mod.decode_request = timed("    decode_request (msgpack)",
                                       descriptors.decode_request)
    session_mod.check_refs = timed("    check_refs", descriptors.check_refs)
    Signature.order_inputs = timed("    order_inputs", Signature.order_inputs)
    S._input = timed("    _input (torch.frombuffer view)", S._input)
    S.execute = timed("execute (whole)", S.execute)
    Executor.run = staticmethod(timed("  executor.run (inference_mode + forward + checks)",
                                      Executor.run))
    S._response = timed("  _response (cached plan)", S._response)
    S.finish = timed("  finish (write + publish + release + wake)", S.finish)
    records.write = timed("    records.write (header + desc + tensor copy)", records.write)
    ring.RingConsumer.release = timed("    ring.release", ring.RingConsumer.release)
    waiting.Notifier.notify = timed("    notify (fence + flag + eventfd write)",
                                    waiting.Notifier.notify)


def stats(xs: list[int]) -> dict:
    xs = sorted(xs)
    n = len(xs)
    return {"count": n, "p50_us": xs[n // 2] / 1e3, "mean_us": sum(xs) / n / 1e3,
            "p90_us": xs[n * 9 // 10] / 1e3, "p99_us": xs[min(n - 1, n * 99 // 100)] / 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="timed requests per case")
    ap.add_argument("--json", action="store_true", help="JSON lines only (for run.py)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    executor = Executor()
    registry = Registry(executor.aside(builtin_models))
    cases = [("identity", "4 KiB f32", torch.arange(1024, dtype=torch.float32)),
             ("identity", "16 B f32", torch.arange(4, dtype=torch.float32)),
             ("mlp", "1 row (64 B f32)", torch.ones(1, 16))]
    rows = []
    pair = Pair(executor, registry)
    try:
        for model, what, x in cases:
            run(pair, model, x, max(200, args.n // 10))  # warm-up: plan cache, allocator
            rows.append({"case": f"{model} {what}", "model": model,
                         **stats(run(pair, model, x, args.n))})
        patch()
        model, what, x = cases[0]
        run(pair, model, x, max(200, args.n // 10))
        samples.clear()
        run(pair, model, x, args.n)
        steps = [{"step": k, **stats(v)} for k, v in samples.items()]
    finally:
        pair.close()
        stop = getattr(executor, "stop", None)  # not every version of the executor has one
        if stop is not None:
            stop()
    if args.json:
        for r in rows:
            print(json.dumps({"hotpath": r}))
        for s in steps:
            print(json.dumps({"hotpath_step": s, "case": f"{model} {what}"}))
        return 0
    print("take + execute per request (µs):")
    for r in rows:
        print(f"  {r['case']:24} p50 {r['p50_us']:7.2f}  mean {r['mean_us']:7.2f}  "
              f"p99 {r['p99_us']:7.2f}  n={r['count']}")
    print(f"\nper step, {model} {what} (wrappers ~0.3 µs each):")
    print(f"  {'step':54} {'count':>7} {'p50 µs':>8} {'mean µs':>8}")
    for s in steps:
        print(f"  {s['step']:54} {s['count']:7d} {s['p50_us']:8.2f} {s['mean_us']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
