"""Where a request's time goes inside the daemon: runs `tensord serve` in this process with
timers wrapped around the steps of the session's hot path, and prints a per-step table
(count, mean, p50, p99 in µs) when it stops (SIGTERM/SIGINT).

    .venv/bin/python bench/profile_daemon.py --socket /tmp/p.sock [--config FILE]
    bench/bin/loadgen run --transport tensord-copy --addr /tmp/p.sock --sizes 4Ki --duration 5s
    kill -TERM <pid>

The wrappers cost about 0.3 µs each (two perf_counter_ns calls and a list append); `serve`
(everything from a request record being read to its response published and the client
woken) includes them, so the steps add up to a little less than `serve`. `idle` is the time
the session spends in its waiter between requests: the client's and the kernel's share of a
round trip. This file only wraps the daemon's functions; it changes none of them."""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import threading
import time
from collections import defaultdict

from tensord import session as session_mod
from tensord.config import DaemonConfig, load_config
from tensord.contract import descriptors
from tensord.executor import Executor
from tensord.models.builtin import builtin_models
from tensord.models.registry import Registry
from tensord.models.signature import Signature
from tensord.server import Server
from tensord.transport import records, ring, waiting

samples: dict[str, list[int]] = defaultdict(list)
_lock = threading.Lock()


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
    S = session_mod.Session
    S._serve = timed("serve (whole request)", S._serve)
    session_mod.decode_request = timed("decode_request (msgpack + dataclasses)",
                                       descriptors.decode_request)
    session_mod.check_refs = timed("check_refs", descriptors.check_refs)
    Signature.order_inputs = timed("order_inputs", Signature.order_inputs)
    S._input = timed("_input (torch.frombuffer view)", S._input)
    Executor.run = timed("executor.run (inference_mode + forward + checks)", Executor.run)
    S._respond = timed("_respond (plan + reserve + write + publish + notify)", S._respond)
    session_mod.encode_descriptor = timed("  encode_descriptor (in plan)",
                                          descriptors.encode_descriptor)
    records.plan = timed("  records.plan", records.plan)
    records.write = timed("  records.write (header + desc + tensor copy)", records.write)
    S._reserve = timed("  _reserve", S._reserve)
    ring.RingConsumer.poll = timed("ring.poll (request headers)", ring.RingConsumer.poll)
    ring.RingConsumer.release = timed("ring.release", ring.RingConsumer.release)

    orig_notify = waiting.Notifier.notify

    def notify(self) -> None:
        t0 = time.perf_counter_ns()
        waiting.full_fence()
        t1 = time.perf_counter_ns()
        posted = self.ctl.flag(self.flag)
        if posted:
            self.sem.release()
        t2 = time.perf_counter_ns()
        samples["  notify: full_fence"].append(t1 - t0)
        samples["  notify: sem_post (peer was asleep)" if posted
                else "  notify: no post (peer spinning)"].append(t2 - t1)

    notify.__wrapped__ = orig_notify
    waiting.Notifier.notify = notify
    waiting.Waiter.wait = timed("idle: Waiter.wait (between requests)", waiting.Waiter.wait)


def report() -> str:
    rows = []
    for name, xs in samples.items():
        if not xs:
            continue
        xs = sorted(xs)
        n = len(xs)
        rows.append((name, n, sum(xs) / n / 1e3, xs[n // 2] / 1e3, xs[min(n - 1, n * 99 // 100)]
                     / 1e3))
    order = {name: i for i, name in enumerate(samples)}
    rows.sort(key=lambda r: order[r[0]])
    out = [f"{'step':58} {'count':>8} {'mean µs':>9} {'p50 µs':>9} {'p99 µs':>9}"]
    out += [f"{r[0]:58} {r[1]:8d} {r[2]:9.2f} {r[3]:9.2f} {r[4]:9.2f}" for r in rows]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--config")
    args = ap.parse_args()
    cfg = load_config(args.config) if args.config else DaemonConfig()
    cfg.socket = args.socket
    patch()
    server = Server(cfg, Registry(builtin_models()), Executor())
    server.listen()
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    signal.signal(signal.SIGINT, lambda *_: server.shutdown())
    print("profile_daemon: ready", file=sys.stderr, flush=True)
    server.serve_forever()
    print(report(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
