"""Operator commands that talk to a running daemon over its socket: `tensord stats`,
`status`, `models`, `ping` and `health` (which exits 1 when the daemon is not ready, for
probes). They open a control-only connection (probe.py): no session, no torch."""

from __future__ import annotations

import argparse
import sys
import time

from .contract.errors import TensordError


def add_parsers(sub) -> None:
    for name, op, what in (
            ("stats", _stats, "per-model queue, batching and latency counters"),
            ("status", _status, "daemon, models, versions, queue depths and readiness"),
            ("models", _models, "the models and their inputs and outputs"),
            ("ping", _ping, "whether the daemon answers on its socket"),
            ("health", _health, "readiness: exits 1 when draining or a model is stuck")):
        p = sub.add_parser(name, help=f"{what} of a running daemon")
        p.add_argument("--socket", help="the daemon's socket (default: as for serve)")
        p.set_defaults(op=op)


def run(args: argparse.Namespace) -> int:
    # A control-only connection (no session, no shared memory) from a client that imports
    # no torch: a probe costs milliseconds and a few MB, not seconds and 850 MB (issue 17.8).
    from .probe import ControlClient

    try:
        with ControlClient(args.socket, name="tensord " + args.cmd) as c:
            return args.op(c)
    except TensordError as e:
        print(f"tensord {args.cmd}: {e.message}", file=sys.stderr)
        return 1


def _ping(c) -> int:
    t0 = time.perf_counter()
    c.ping()
    print(f"{c.welcome.daemon} answered in {(time.perf_counter() - t0) * 1e3:.2f} ms")
    return 0


def _models(c) -> int:
    for m in c.models():
        ins = ", ".join(_spec(s) for s in m.inputs)
        outs = ", ".join(_spec(s) for s in m.outputs)
        print(f"{m.name} v{m.version} on {m.device}: {ins} -> {outs}")
    return 0


def _spec(s) -> str:
    shape = "[*]" if s.shape is None else "[" + ",".join("?" if d < 0 else str(d)
                                                          for d in s.shape) + "]"
    return f"{s.name} {s.dtype}{shape}"


def _health(c) -> int:
    h = c.health()
    print("ready" if h.ready else f"not ready: {h.reason}")
    return 0 if h.ready else 1


def _status(c) -> int:
    h = c.health()
    stats = {m.name: m for m in c.stats()}
    print(f"{c.welcome.daemon}: {'ready' if h.ready else 'NOT READY: ' + h.reason}"
          f"{' (draining)' if h.draining else ''}")
    for m in h.models:
        st = stats.get(m.name)
        served = f", {st.served} served, {st.rejected} rejected" if st else ""
        running = f", running for {m.running_ms / 1e3:.1f} s" if m.running_ms else ""
        print(f"  {m.name} v{m.version}: {'ready' if m.ready else 'STUCK'}, "
              f"{m.queued} queued{running}{served}")
    return 0 if h.ready else 1


def _stats(c) -> int:
    # The columns are the outcomes Prometheus counts (tensord_requests_total{outcome}) and
    # the log names: ok, MODEL_FAILED/INTERNAL, BAD_INPUT (and kin), OVERLOADED, DEADLINE.
    rows = [("model", "ver", "queued", "served", "failed", "bad input", "rejected", "expired",
             "batches", "mean batch", "mean queue ms", "mean compute ms")]
    for m in c.stats():
        bad = m.bad_input or 0
        served = m.served + m.failed  # what ran in a batch (near enough)
        rows.append((m.name, str(m.version), str(m.queued), str(m.served), str(m.failed),
                     str(bad), str(m.rejected), str(m.expired), str(m.batches),
                     f"{served / m.batches:.1f}" if m.batches else "-",
                     f"{m.queue_us / 1e3 / served:.2f}" if served else "-",
                     f"{m.compute_us / 1e3 / m.batches:.2f}" if m.batches else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                        for i, (v, w) in enumerate(zip(r, widths))))
    for m in c.stats():
        if m.batch_sizes:
            sizes = ", ".join(f"{s}×{n}" for s, n in m.batch_sizes)
            print(f"{m.name} batch sizes (size×passes): {sizes}")
    return 0
