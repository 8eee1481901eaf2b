"""Turns a results JSON (from bench/run.py) into markdown tables and PNG plots beside it:

    <stem>.md              every table: the targets, floors, latency by size, 4 KiB detail,
                           bandwidth, MLP, throughput vs concurrency, the idle daemon, the Go
                           client's benchmarks, the daemon's hot path
    <stem>-latency.png     p50 and p99 latency vs payload size, one line per transport
    <stem>-throughput.png  throughput vs concurrent callers (goroutines, processes)

    python bench/report.py bench/results/<stem>.json [--readme]

--readme also replaces the generated part of bench/README.md (between its results markers)
with these tables and links to these plots."""

from __future__ import annotations

import json
import operator
import sys
from collections import defaultdict
from pathlib import Path
from statistics import median

ORDER = ["tensord-copy/block", "tensord-zerocopy/block", "tensord-copy/spin",
         "tensord-zerocopy/spin", "msgpack-uds", "grpc-uds", "http-json"]
BASELINES = ["msgpack-uds", "grpc-uds", "http-json"]
HEADLINE = 4096
BIG = 64 << 20
MLP_ROW = 64
FLOORS = ("eventfd", "eventfd-idle", "spin")
FLOOR_NAMES = {"eventfd": "blocking: Go↔Python eventfd ping-pong, back to back",
               "eventfd-idle": "blocking, both sides idle 1 ms before each round",
               "spin": "spinning: Go↔Python busy-poll ping-pong"}


def order_key(label: str) -> tuple[int, str]:
    for i, prefix in enumerate(ORDER):
        if label.startswith(prefix):
            return i, label
    return len(ORDER), label


def size_name(n: int) -> str:
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def us(v: float | None) -> str:
    if v is None:
        return "—"
    if v >= 10000:
        return f"{v / 1000:,.1f} ms"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def dur(v: float) -> str:
    """A time given in µs, with its unit."""
    return f"{v / 1000:,.1f} ms" if v >= 10000 else f"{us(v)} µs"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "—"
    r = a / b
    return f"{r:,.0f}×" if r >= 100 else f"{r:.1f}×" if r >= 10 else f"{r:.2f}×"


def table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


class Results:
    def __init__(self, doc: dict):
        self.meta = doc["meta"]
        self.errors = doc.get("errors", [])
        self.floor = {f["floor"]: f for f in doc["floors"] if f["floor"] != "memcpy"}
        self.memcpy = {f["size"]: f for f in doc["floors"] if f["floor"] == "memcpy"}
        self.pts: dict[tuple, dict] = {}
        for p in doc["points"]:
            self.pts[(p["label"], p["model"], p["size"], p["callers"], p["mode"])] = p
        self.labels = sorted({p["label"] for p in doc["points"] + doc.get("headline", [])},
                             key=order_key)
        self.tensord = [lb for lb in self.labels if lb.startswith("tensord")]
        # Interleaved 4 KiB rounds: per label (and floor) the list of per-round results;
        # mlp_rounds: the same rounds' mlp points (one row).
        self.rounds: dict[str, list[dict]] = defaultdict(list)
        self.mlp_rounds: dict[str, list[dict]] = defaultdict(list)
        for p in doc.get("headline", []):
            if p["model"] == "identity":
                self.rounds[p["label"]].append(p)
            else:
                self.mlp_rounds[p["label"]].append(p)
        self.idle = doc.get("idle")
        self.gobench = {b["name"]: b for b in doc.get("gobench") or []}
        self.hotpath = doc.get("hotpath") or {}
        self.floor_rounds: dict[str, list[dict]] = defaultdict(list)
        for f in doc.get("headline_floors", []):
            self.floor_rounds[f["floor"]].append(f)
        # batching phase: (case label, variant) -> {round: point}; gateway: (label, size) ->
        # {round: point}
        self.batching = doc.get("batching") or {}
        self.brounds: dict[tuple, dict] = defaultdict(dict)
        for p in self.batching.get("rows", []):
            self.brounds[(p["label"], p.get("variant", ""))][p["round"]] = p
        self.grounds: dict[tuple, dict] = defaultdict(dict)
        for p in doc.get("gateway") or []:
            self.grounds[(p["label"], p["size"])][p["round"]] = p

    def head(self, label: str, field: str = "p50_us") -> float | None:
        """The headline value: median over the interleaved rounds, else the sweep's point."""
        rs = self.rounds.get(label)
        if rs:
            return median([p[field] for p in rs])
        p = self.get(label)
        return p[field] if p else None

    def head_floor(self, kind: str, field: str = "p50_us") -> float | None:
        fs = self.floor_rounds.get(kind)
        if fs:
            return median([f[field] for f in fs])
        f = self.floor.get(kind)
        return f[field] if f else None

    def by_round(self, label: str, field: str = "p50_us", model: str = "identity") -> dict:
        src = self.rounds if model == "identity" else self.mlp_rounds
        return {p["round"]: p[field] for p in src.get(label, [])}

    def floor_by_round(self, kind: str, field: str = "p50_us") -> dict:
        return {f["round"]: f[field] for f in self.floor_rounds.get(kind, [])}

    def round_median(self, a: dict, b: dict, op) -> float | None:
        """Median over the rounds both have of op(a[r], b[r]): ratios (or differences)
        within each round, so load that changes between rounds cancels."""
        vals = [op(a[k], b[k]) for k in a if k in b and b[k]]
        return median(vals) if vals else None

    def get(self, label, model="identity", size=HEADLINE, callers=1, mode="goroutines"):
        return self.pts.get((label, model, size, callers, mode))

    def p50(self, *a, **k) -> float | None:
        p = self.get(*a, **k)
        return p["p50_us"] if p else None

    def sizes(self, model: str) -> list[int]:
        return sorted({k[2] for k in self.pts if k[1] == model and k[3] == 1})

    def first(self, prefix: str) -> str | None:
        return next((lb for lb in self.labels if lb.startswith(prefix)), None)


def floors_md(r: Results) -> str:
    rows = []
    names = FLOOR_NAMES
    for k in FLOORS:
        f = r.floor.get(k)
        if f:
            rows.append([names[k], us(f["p50_us"]), us(f["p90_us"]), us(f["p99_us"]),
                         us(f["p999_us"]), us(f["max_us"]), us(f["mean_us"]), f"{f['count']:,}"])
    for k in FLOORS:
        fs = r.floor_rounds.get(k)
        if fs:
            med = {f: median(x[f] for x in fs) for f in ("p50_us", "p90_us", "p99_us",
                                                          "p999_us", "mean_us")}
            rows.append([f"{names[k].split(':')[0]}: median of {len(fs)} headline rounds",
                         us(med["p50_us"]), us(med["p90_us"]), us(med["p99_us"]),
                         us(med["p999_us"]), us(max(x["max_us"] for x in fs)),
                         us(med["mean_us"]), f"{sum(x['count'] for x in fs):,}"])
    out = table(["floor (round trip, no payload)", "p50 µs", "p90", "p99", "p99.9", "max",
                 "mean", "rounds"], rows)
    if r.memcpy:
        out += "\n\n" + table(
            ["memcpy size", "p50 per copy", "bandwidth GB/s"],
            [[size_name(s), f"{f['p50_us']:.3f} µs" if f["p50_us"] < 100 else us(f["p50_us"]),
              f"{f['gbps']:.1f}"] for s, f in sorted(r.memcpy.items())])
    return out


def latency_md(r: Results, field: str) -> str:
    sizes = r.sizes("identity")
    rows = []
    for s in sizes:
        rows.append([size_name(s)] + [us((r.get(lb, size=s) or {}).get(field)) for lb in r.labels])
    return table(["payload"] + r.labels, rows)


def headline_md(r: Results) -> str:
    ref = r.first("tensord-copy/block")
    sem, idle, spin = (r.head_floor(k) for k in FLOORS)
    rows = []
    for lb in r.labels:
        p50 = r.head(lb)
        if p50 is None:
            continue
        rs = r.rounds.get(lb, [])
        spread = (f" ({us(min(p['p50_us'] for p in rs))}–{us(max(p['p50_us'] for p in rs))})"
                  if len(rs) > 1 else "")
        rows.append([lb, us(p50) + spread, us(r.head(lb, "p90_us")), us(r.head(lb, "p99_us")),
                     us(r.head(lb, "p999_us")), f"{r.head(lb, 'throughput_rps'):,.0f}",
                     ratio(p50, sem), ratio(p50, idle), ratio(p50, spin),
                     ratio(p50, r.head(ref)) if ref else "—"])
    n = max((len(v) for v in r.rounds.values()), default=0)
    note = (f"Median over {n} interleaved rounds (all servers up, each round: floors, then "
            "every transport in turn, order alternating); p50 range over rounds in brackets. "
            "Floors are the same rounds' medians.\n\n" if n else "")
    return note + table(["transport", "p50 µs (range)", "p90", "p99", "p99.9", "req/s",
                         "÷ eventfd floor", "÷ idle eventfd floor", "÷ spinning floor",
                         f"÷ {ref}"], rows)


def versus_md(r: Results) -> str:
    """Each baseline's p50 divided by tensord's, per size: how many times faster tensord is."""
    sizes = r.sizes("identity")
    refs = [lb for lb in (r.first("tensord-copy/block"), r.first("tensord-zerocopy/block"))
            if lb]
    bases = [b for b in BASELINES if b in r.labels]
    head = ["payload"] + [f"{b} ÷ {t}" for b in bases for t in refs]
    rows = []
    for s in sizes:
        rows.append([size_name(s)] + [ratio(r.p50(b, size=s), r.p50(t, size=s))
                                      for b in bases for t in refs])
    return table(head, rows)


def bandwidth_md(r: Results) -> str:
    big = [s for s in r.sizes("identity") if s >= 1 << 20]
    rows = []
    for lb in r.labels:
        row = [lb]
        for s in big:
            p50 = r.p50(lb, size=s)
            row.append(f"{dur(p50)} · {2 * s / (p50 * 1e3):.2f} GB/s" if p50 else "—")
        mc = r.memcpy.get(big[-1]) if big else None
        p50 = r.p50(lb, size=big[-1]) if big else None
        row.append(f"{100 * (2 * big[-1] / (p50 * 1e3)) / mc['gbps']:.0f} %" if p50 and mc
                   else "—")
        rows.append(row)
    head = ["transport"] + [f"{size_name(s)}: p50 RTT · one-way GB/s" for s in big]
    head.append(f"one-way ÷ memcpy at {size_name(big[-1])}" if big else "")
    return table(head, rows)


def mlp_md(r: Results) -> str:
    rows = []
    for s in r.sizes("mlp"):
        rows.append([f"{size_name(s)} ({s // 64} row{'s' if s > 64 else ''})"]
                    + [us(r.p50(lb, model="mlp", size=s)) for lb in r.labels])
    return table(["mlp input"] + r.labels, rows)


def conc_cells(r: Results) -> list[tuple[int, str]]:
    """(callers, mode) measured at 4 KiB; one caller is the same in both modes."""
    cells = {(k[3], k[4]) for k in r.pts if k[1] == "identity" and k[2] == HEADLINE}
    cells = {c for c in cells if not (c[0] == 1 and c[1] == "processes")}
    return sorted(cells, key=lambda c: (c[0] > 1 and c[1] != "goroutines", c[0]))


def conc_md(r: Results) -> str:
    cells = conc_cells(r)
    head = ["transport"] + [f"{c} {'gor.' if m == 'goroutines' else 'proc.'}" for c, m in cells]
    rows = []
    for lb in r.labels:
        row = [lb]
        for c, m in cells:
            p = r.get(lb, callers=c, mode=m)
            row.append(f"{p['throughput_rps']:,.0f} /s · p50 {us(p['p50_us'])} · p99 "
                       f"{us(p['p99_us'])}" if p else "—")
        rows.append(row)
    return table(head, rows)


def rps(r: Results, label: str | None, callers: int, mode: str) -> float | None:
    p = r.get(label, callers=callers, mode=mode) if label else None
    return p["throughput_rps"] if p else None



# The figures of the run before the native serving core (issue 16's "now" column), for the
# same machine class: AMD EPYC, 2 vCPUs, quick profile.
BEFORE_NATIVE = {"mlp_8x8_rows_s": 8500.0}


def native_targets(r: Results) -> list[tuple[str, str, str, bool | None]]:
    """Issue 16's targets for the native serving core, from this run (ratios within it)."""
    out: list[tuple[str, str, str, bool | None]] = []
    div, sub = operator.truediv, operator.sub
    blk, zcb = r.first("tensord-copy/block"), r.first("tensord-zerocopy/block")
    spn, zcs = r.first("tensord-copy/spin"), r.first("tensord-zerocopy/spin")
    blocking = [lb for lb in (blk, zcb) if lb and r.head(lb)]
    spinning = [lb for lb in (spn, zcs) if lb and r.head(lb)]

    def best(labels, value, lower=True):
        vals = [(v, lb) for lb in labels if (v := value(lb)) is not None]
        return (min(vals) if lower else max(vals)) if vals else (None, None)

    cases = {c["case"]: c for c in r.hotpath.get("cases", [])}
    c = cases.get("identity 4 KiB f32")
    if c:
        out.append(("daemon CPU per identity request, in-process (intake + respond; its "
                    "threads' CPU clocks)", f"{c['p50_us']:.2f} µs p50, {c['mean_us']:.2f} µs "
                    "mean", "≤ 2 µs", c["p50_us"] <= 2))
    idle_f = r.floor_by_round("eventfd-idle")
    v, lb = best(blocking, lambda x: r.round_median(r.by_round(x), idle_f, div))
    if v is not None:
        out.append(("4 KiB identity p50, blocking ÷ idle eventfd floor",
                    f"{v:.2f}× ({lb}: {dur(r.head(lb))} ÷ {dur(r.head_floor('eventfd-idle'))})",
                    "≤ 1.15×", v <= 1.15))
    v, lb = best(spinning, lambda x: r.head(x))
    if v is not None:
        out.append(("4 KiB identity p50, spin-then-block", f"{dur(v)} ({lb})", "≤ 5 µs",
                    v <= 5))
    v, lb = best(blocking, lambda x: r.round_median(r.by_round(x, model="mlp"),
                                                    r.by_round(x), sub))
    if v is not None:
        out.append(("mlp one row, blocking, p50 minus identity p50", f"+{v:.1f} µs ({lb})",
                    "≤ +15 µs", v <= 15))
    b = r.brounds
    on, off = b.get(("mlp-8x8", "batched"), {}), b.get(("mlp-8x8", "unbatched"), {})
    ident = b.get(("identity-8x8", "batched"), {})

    def tput(p):
        return p["throughput_rps"]

    if on:
        rows_s = rmed(on, tput)
        unb = rmed(off, tput) if off else None
        before = BEFORE_NATIVE["mlp_8x8_rows_s"]
        ok = rows_s >= 10 * before and (unb is None or rows_s >= 5 * unb)
        out.append(("mlp one row, 8 processes × 8 goroutines: rows/s",
                    f"{rows_s:,.0f} rows/s = {rows_s / before:.1f}× the 8.5 k before the core"
                    + (f"; {rows_s / unb:.1f}× unbatched ({unb:,.0f}) in this run" if unb else ""),
                    "≥ 10× 8.5 k, ≥ 5× unbatched", ok))
        if ident:
            v, vals = per_round(on, ident, tput, tput, div)
            if v is not None:
                out.append(("the same ÷ 4 KiB identity req/s from the same 8 × 8 callers",
                            f"{v:.2f}{rng(vals)} (identity {rmed(ident, tput):,.0f}/s)",
                            "≥ 0.5", v >= 0.5))
    alone = b.get(("fair-alone", "batched"), {})
    for label, want in (("fair-flood", 3.0), ("fair-flood-high", 2.0)):
        flood = b.get((label, "batched"), {})
        if alone and flood:
            def p99(p):
                return p["p99_us"]
            v, vals = per_round(flood, alone, p99, p99, div)
            if v is not None:
                prio = "high" if label.endswith("high") else "normal"
                out.append((f"light client's p99 beside a 64-goroutine flood ({prio} priority)",
                            f"{v:.2f}× its p99 alone{rng(vals)}: {dur(rmed(flood, p99))} vs "
                            f"{dur(rmed(alone, p99))}", f"≤ {want:g}×", v <= want))
    v, lb = best(blocking, lambda x: rps(r, x, 8, "goroutines"), lower=False)
    if v is not None:
        out.append(("8 goroutines, 4 KiB identity", f"{v:,.0f}/s ({lb})", "≥ 100 k/s",
                    v >= 100000))
    m64 = rps(r, "msgpack-uds", 64, "processes")
    v, lb = best(blocking, lambda x: rps(r, x, 64, "processes"), lower=False)
    if v is not None and m64:
        t8 = rps(r, lb, 8, "processes")
        out.append(("64 processes, 4 KiB identity", f"{v:,.0f}/s ({lb}) = {v / m64:.1f}× "
                    f"msgpack-uds; 8 processes {t8 or 0:,.0f}/s",
                    "≥ the 8-process figure, ≥ 5× msgpack-uds",
                    v >= 5 * m64 and (t8 is None or v >= t8)))
    mc = r.memcpy.get(BIG)
    v, lb = best([x for x in (zcb, zcs) if x], lambda x: r.p50(x, size=BIG))
    if v is not None and mc:
        bw = 2 * BIG / (v * 1e3)
        out.append(("64 MiB zero-copy one-way ÷ memcpy", f"{100 * bw / mc['gbps']:.0f} % "
                    f"({lb})", "≥ 75 %", bw / mc["gbps"] >= 0.75))
    return out


def targets(r: Results) -> list[tuple[str, str, str, bool | None]]:
    """The Data plane v2 targets: (measure, value in this run, target, met). 4 KiB f32
    identity and one Go caller unless the measure says otherwise. Latency ratios are taken
    within each interleaved headline round, then the median over rounds. Where both
    tensord clients were measured (Infer: copy; NewRequest/Do: zerocopy), the better one
    counts and is named; the other is shown beside it."""
    out = []
    blk, zcb = r.first("tensord-copy/block"), r.first("tensord-zerocopy/block")
    spn, zcs = r.first("tensord-copy/spin"), r.first("tensord-zerocopy/spin")
    blocking = [lb for lb in (blk, zcb) if lb and r.head(lb)]
    spinning = [lb for lb in (spn, zcs) if lb and r.head(lb)]
    div, sub = operator.truediv, operator.sub

    def pick(labels, value, lower_better=True):
        """(best value, its label, 'other: value' text) over labels."""
        vals = [(value(lb), lb) for lb in labels]
        vals = [(v, lb) for v, lb in vals if v is not None]
        if not vals:
            return None, None, ""
        best = min(vals) if lower_better else max(vals)
        rest = [f"{lb}: {v:.3g}" for v, lb in vals if lb != best[1]]
        return best[0], best[1], (f" (other: {', '.join(rest)})" if rest else "")

    # 1. blocking p50 ÷ idle eventfd floor
    idle_f = r.floor_by_round("eventfd-idle")
    v, lb, other = pick(blocking, lambda x: r.round_median(r.by_round(x), idle_f, div))
    if v is not None:
        floor = dur(r.head_floor("eventfd-idle"))
        out.append(("p50, blocking waits ÷ idle blocking floor (eventfd ping-pong with 1 ms "
                    "gaps)", f"{v:.2f}× ({lb}: {dur(r.head(lb))} ÷ {floor}){other}", "≤ 1.3×",
                    v <= 1.3))
    # 2. blocking vs msgpack-uds
    mp = r.by_round("msgpack-uds")
    v, lb, other = pick(blocking, lambda x: r.round_median(mp, r.by_round(x), div), False)
    if v is not None:
        out.append(("p50, blocking waits, vs msgpack-uds",
                    f"{v:.2f}× faster (msgpack-uds {dur(r.head('msgpack-uds'))} ÷ {lb} "
                    f"{dur(r.head(lb))}){other}", "≥ 2× faster", v >= 2))
    # 3. spin-then-block p50
    v, lb, other = pick(spinning, lambda x: r.head(x))
    if v is not None:
        out.append((f"p50, spin-then-block ({r.meta.get('spin_us', 100)} µs)",
                     f"{dur(v)} ({lb}){other}", "≤ 10 µs", v <= 10))
    # 4. vs gRPC
    g = r.by_round("grpc-uds")
    vb, lbb, _ = pick(blocking, lambda x: r.round_median(g, r.by_round(x), div), False)
    vs, lbs, _ = pick(spinning, lambda x: r.round_median(g, r.by_round(x), div), False)
    if vb is not None or vs is not None:
        parts = []
        if vb is not None:
            parts.append(f"blocking {vb:.1f}× ({lbb})")
        if vs is not None:
            parts.append(f"spin {vs:.1f}× ({lbs})")
        ok = (vb is None or vb >= 10) and (vs is None or vs >= 30)
        out.append(("p50 vs gRPC-over-UDS", "; ".join(parts) + f"; grpc-uds p50 "
                    f"{dur(r.head('grpc-uds'))}", "≥ 10× blocking, ≥ 30× spin", ok))
    # 5. mlp one row minus identity, blocking
    v, lb, other = pick(blocking, lambda x: r.round_median(
        r.by_round(x, model="mlp"), r.by_round(x), sub))
    if v is not None:
        mlp = median(r.by_round(lb, model="mlp").values())
        out.append(("mlp one row (1×16 f32), blocking, p50 minus identity p50",
                    f"+{v:.1f} µs ({lb}: mlp {dur(mlp)}, identity {dur(r.head(lb))}){other}",
                    "≤ +25 µs", v <= 25))
    # 6. 64 client processes
    m64, m8 = rps(r, "msgpack-uds", 64, "processes"), None
    v, lb, other = pick(blocking, lambda x: rps(r, x, 64, "processes"), False)
    if v is not None and m64:
        t8 = rps(r, lb, 8, "processes")
        spin_txt = "; ".join(f"{x}: {rps(r, x, 64, 'processes'):,.0f}/s"
                             for x in spinning if rps(r, x, 64, "processes"))
        out.append(("64 client processes, aggregate req/s",
                    f"{v:,.0f}/s ({lb}) = {v / m64:.2f}× msgpack-uds ({m64:,.0f}/s); 8 processes "
                    f"{t8:,.0f}/s{other}" + (f"; spinning: {spin_txt}" if spin_txt else ""),
                    "≥ 3× msgpack-uds in the same run, and no lower than 8 processes",
                    v >= 3 * m64 and (t8 is None or v >= t8)))
        del m8
    # 7. 8 goroutines on one client
    v, lb, other = pick(blocking, lambda x: rps(r, x, 8, "goroutines"), False)
    if v is not None:
        spin_txt = "; ".join(f"{x}: {rps(r, x, 8, 'goroutines'):,.0f}/s"
                             for x in spinning if rps(r, x, 8, "goroutines"))
        out.append(("8 goroutines on one client, req/s", f"{v:,.0f}/s ({lb}){other}"
                    + (f"; spinning: {spin_txt}" if spin_txt else ""), "≥ 60 k", v >= 60000))
    # 8. 64 MiB zero-copy one-way ÷ memcpy
    mc = r.memcpy.get(BIG)
    v, lb, other = pick([x for x in (zcb, zcs) if x], lambda x: r.p50(x, size=BIG))
    if v is not None and mc:
        bw = 2 * BIG / (v * 1e3)
        out.append(("64 MiB zero-copy one-way ÷ memcpy",
                    f"{100 * bw / mc['gbps']:.0f} % ({lb}: {bw:.2f} GB/s = 2 × 64 MiB ÷ p50 "
                    f"{dur(v)}; memcpy {mc['gbps']:.2f} GB/s)", "≥ 70 %", bw / mc["gbps"] >= 0.7))
    # 9. idle daemon
    if r.idle:
        i = r.idle
        out.append((f"idle daemon, {i['sessions']} idle sessions, CPU",
                    f"{i['cpu_pct']:.2f} % of a core over {i['seconds']:.0f} s (utime+stime; "
                    f"scheduler run time {i['cpu_pct_schedstat']:.3f} %; "
                    f"{i['context_switches']} context switches, {i['threads']} threads)",
                    "< 1 % of a core", i["cpu_pct"] < 1))
    # 10. Go client CPU and allocations
    inf, zc = r.gobench.get("BenchmarkInfer4KiB"), r.gobench.get("BenchmarkZeroCopy4KiB")
    if inf or zc:
        cpu = inf["metrics"].get("call-cpu-ns/op") if inf else None
        allocs = zc["metrics"].get("allocs/op") if zc else None
        txt = []
        if cpu is not None:
            txt.append(f"{cpu / 1e3:.2f} µs calling-thread CPU per Infer "
                       f"(process: {inf['metrics'].get('proc-cpu-ns/op', 0) / 1e3:.2f} µs)")
        if allocs is not None:
            txt.append(f"{allocs:.0f} allocs per zero-copy call")
        out.append(("Go client CPU per 4 KiB Infer / allocs per zero-copy call",
                    "; ".join(txt) + " (go test -bench, real daemon)", "≤ 3 µs / 0",
                    (cpu is None or cpu <= 3000) and (allocs is None or allocs == 0)))
    return out


# -- batching and the gateway ----------------------------------------------------------------


def rmed(rounds: dict, f) -> float | None:
    vals = [v for v in (f(p) for p in rounds.values()) if v is not None]
    return median(vals) if vals else None


def per_round(a: dict, b: dict, fa, fb, op) -> tuple[float | None, list[float]]:
    """Median over the rounds both have of op(fa(a[r]), fb(b[r])), and the per-round values."""
    vals = [op(fa(a[k]), fb(b[k])) for k in a if k in b and fb(b[k])]
    return (median(vals) if vals else None), vals


def rng(vals: list[float], fmt="{:.2f}") -> str:
    return f" (rounds {fmt.format(min(vals))}–{fmt.format(max(vals))})" if len(vals) > 1 else ""


def stat(p: dict, key: str) -> float | None:
    m = p.get("model_stats")
    return m.get(key) if m else None


def batching_targets(r: Results) -> list[tuple[str, str, str, bool | None]]:
    b = r.brounds
    div = operator.truediv
    out: list[tuple[str, str, str, bool | None]] = []
    cfg = r.batching.get("config", {})
    skipped = r.batching.get("skipped", {})

    def both(case):
        return b.get((case, "batched"), {}), b.get((case, "unbatched"), {})

    def tput(p):
        return p["throughput_rps"]

    def mb(x):
        return rmed(x, lambda p: stat(p, "mean_batch"))

    on, off = both("mlp-8x8")
    if on and off:
        v, vals = per_round(on, off, tput, tput, div)
        out.append((f"mlp (16→64→4) one row per request, {cfg.get('mlp_procs')} processes × "
                    f"{cfg.get('mlp_per_proc')} goroutines: rows/s batched ÷ unbatched",
                    f"{v:.2f}×{rng(vals)}: {rmed(on, tput):,.0f} vs {rmed(off, tput):,.0f} rows/s;"
                    f" mean batch {mb(on) or 0:.1f} vs {mb(off) or 0:.1f}", "≥ 5×", v >= 5))
    on, off = both(f"effnet-{cfg.get('image_callers', [8, 32])[0]}")
    if on and off:
        v, vals = per_round(on, off, tput, tput, div)
        out.append((f"EfficientNet-Lite0 (CPU), {cfg.get('image_callers', [8])[0]} callers: "
                     "images/s batched ÷ unbatched",
                     f"{v:.2f}×{rng(vals)}: {rmed(on, tput):.1f} vs {rmed(off, tput):.1f} "
                     f"images/s; mean batch {mb(on) or 0:.1f}", "≥ 1.3×", v >= 1.3))
    elif "efficientnet" in skipped:
        out.append(("EfficientNet-Lite0 (CPU) images/s and p99", "skipped: "
                    + skipped["efficientnet"], "≥ 1.3× / no worse", None))
    on, off = both(f"effnet-{cfg.get('image_callers', [8, 32])[-1]}")
    if on and off:
        def p99(p):
            return p["p99_us"]
        v, vals = per_round(on, off, p99, p99, div)
        out.append((f"EfficientNet-Lite0 (CPU), {cfg.get('image_callers', [8, 32])[-1]} callers:"
                    " p99 batched ÷ unbatched",
                    f"{v:.2f}×{rng(vals)}: {dur(rmed(on, p99))} vs {dur(rmed(off, p99))}; "
                    f"{rmed(on, tput):.1f} vs {rmed(off, tput):.1f} images/s, mean batch "
                    f"{mb(on) or 0:.1f}", "≤ 1× (no worse)", v <= 1.0))
    on, off = both("mlp-1")
    if on and off:
        def p50(p):
            return p["p50_us"]
        v, vals = per_round(on, off, p50, p50, div)
        out.append(("batching overhead, mlp one row, one caller (max_queue_delay_us = 0): "
                    "p50 batched ÷ batching off",
                    f"{100 * (v - 1):+.1f} %{rng([100 * (x - 1) for x in vals], '{:+.0f} %')}: "
                    f"{us(rmed(on, p50))} vs {us(rmed(off, p50))} µs", "≤ +10 %", v <= 1.10))
    alone = b.get(("fair-alone", "batched"), {})
    flood = b.get(("fair-flood", "batched"), {})
    high = b.get(("fair-flood-high", "batched"), {})
    if alone and flood:
        def p99(p):
            return p["p99_us"]

        def fl(p):
            return (p.get("flood_result") or {}).get("throughput_rps")

        def flp99(p):
            return (p.get("flood_result") or {}).get("p99_us")
        txt = (f"alone {us(rmed(alone, p99))} µs; beside a session of {cfg.get('flood')} "
               f"goroutines ({rmed(flood, fl) or 0:,.0f} req/s, its p99 "
               f"{us(rmed(flood, flp99))} µs): {us(rmed(flood, p99))} µs")
        if high:
            txt += f"; at high priority: {us(rmed(high, p99))} µs"
        out.append(("fairness: a light client's p99 (mlp one row, one goroutine) alone and "
                     "under a flooding session", txt, "report", None))
    if skipped.get("gpu"):
        out.append(("GPU targets (batched GPU throughput, H2D from the rings)",
                    "skipped: " + skipped["gpu"], "—", None))
    return out


def batching_md(r: Results) -> str:
    rows = []
    cases = sorted({k for k in r.brounds}, key=lambda k: (k[0], k[1]))
    for label, variant in cases:
        rs = r.brounds[(label, variant)]
        p = next(iter(rs.values()))
        callers = (f"{p['callers']} proc × {p.get('per_proc', 1)}" if p["mode"] == "processes"
                   else str(p["callers"]))
        if p.get("flood"):
            callers += f" + flood {p['flood']}"
        if p.get("priority"):
            callers += " (high)"
        rows.append([label, variant, p["model"], callers,
                     f"{rmed(rs, lambda x: x['throughput_rps']):,.1f}",
                     us(rmed(rs, lambda x: x["p50_us"])), us(rmed(rs, lambda x: x["p99_us"])),
                     f"{rmed(rs, lambda x: stat(x, 'mean_batch')) or 0:.2f}",
                     us(rmed(rs, lambda x: stat(x, "queue_us"))),
                     us(rmed(rs, lambda x: stat(x, "compute_us"))), str(len(rs))])
    return table(["case", "variant", "model", "callers", "req/s", "p50 µs", "p99 µs",
                  "mean batch", "queue µs/req", "pass µs", "rounds"], rows)


GW_LABELS = ["tensord-copy/block", "gw-http-json", "gw-http-binary", "gw-grpc", "grpc-uds",
             "http-json"]


def gateway_targets(r: Results) -> list[tuple[str, str, str, bool | None]]:
    out: list[tuple[str, str, str, bool | None]] = []
    g = r.grounds

    def p50(p):
        return p["p50_us"]
    for gw, base, want, name in (("gw-http-binary", "http-json", 10, "Flask+JSON"),
                                 ("gw-http-json", "http-json", 10, "Flask+JSON"),
                                 ("gw-grpc", "grpc-uds", 1.5, "gRPC-UDS (grpcio)")):
        for size in sorted({k[1] for k in g}):
            a, b = g.get((base, size), {}), g.get((gw, size), {})
            if not a or not b:
                continue
            v, vals = per_round(a, b, p50, p50, operator.truediv)
            out.append((f"{gw} vs {name}, identity {size_name(size)}: {base} p50 ÷ {gw} p50",
                        f"{v:.2f}×{rng(vals, '{:.1f}')}: {dur(rmed(a, p50))} vs "
                        f"{dur(rmed(b, p50))}", f"≥ {want:g}×", v >= want))
    return out


def server_cpu(rs: dict, who: str) -> float | None:
    return rmed(rs, lambda p: (p.get("server_cpu_us") or {}).get(who))


def gateway_md(r: Results) -> str:
    rows = []
    for size in sorted({k[1] for k in r.grounds}):
        ref = r.grounds.get(("tensord-copy/block", size), {})
        for label in GW_LABELS:
            rs = r.grounds.get((label, size))
            if not rs:
                continue
            def cpu(who: str, rs: dict = rs) -> float | None:
                return server_cpu(rs, who)
            p50s = [x["p50_us"] for x in rs.values()]
            add = rmed(rs, lambda p: p["p50_us"]) - rmed(ref, lambda p: p["p50_us"]) \
                if ref and label.startswith("gw-") else None
            rows.append([size_name(size), label,
                         f"{dur(median(p50s))} ({us(min(p50s))}–{us(max(p50s))})",
                         dur(rmed(rs, lambda p: p["p99_us"])),
                         f"{rmed(rs, lambda p: p['throughput_rps']):,.0f}",
                         us(rmed(rs, lambda p: p.get("client_cpu_us"))),
                         us(cpu("gateway")), us(cpu("daemon") or cpu("server")),
                         f"+{dur(add)}" if add is not None else "—"])
    return table(["payload", "transport", "p50 (range)", "p99", "req/s",
                  "client CPU µs/call", "gateway CPU µs/call", "daemon / server CPU µs/call",
                  "p50 − tensord-copy"], rows)


def targets_table(ts: list[tuple[str, str, str, bool | None]]) -> str:
    return table(["measure", "this run", "target", "met?"],
                 [[t, m, want, "—" if ok is None else "met" if ok else "**not met**"]
                  for t, m, want, ok in ts])


def targets_md(r: Results) -> str:
    return table(["measure (4 KiB f32 identity, one Go caller unless said)", "this run",
                  "target", "met?"],
                 [[t, m, want, "met" if ok else "**not met**"] for t, m, want, ok in targets(r)])


def idle_md(r: Results) -> str:
    i = r.idle
    return table(["sessions", "client processes", "seconds", "CPU (utime+stime)",
                  "CPU (schedstat)", "context switches", "daemon threads"],
                 [[str(i["sessions"]), str(i["client_procs"]), f"{i['seconds']:.1f}",
                   f"{i['cpu_pct']:.2f} % of a core", f"{i['cpu_pct_schedstat']:.3f} %",
                   str(i["context_switches"]), str(i["threads"])]])


def gobench_md(r: Results) -> str:
    cols = ["ns/op", "p50-µs", "call-cpu-ns/op", "proc-cpu-ns/op", "B/op", "allocs/op"]
    rows = []
    for name, b in r.gobench.items():
        m = b["metrics"]
        rows.append([name.removeprefix("Benchmark"), f"{b['n']:,}"]
                    + [f"{m[c]:,.0f}" if c in m and m[c] >= 100 else
                       (f"{m[c]:.3g}" if c in m else "—") for c in cols])
    return table(["benchmark", "iterations"] + cols, rows)


def hotpath_md(r: Results) -> str:
    h = r.hotpath
    out = table(["request", "p50 µs", "mean µs", "p99 µs", "requests"],
                [[c["case"], f"{c['p50_us']:.2f}", f"{c['mean_us']:.2f}", f"{c['p99_us']:.2f}",
                  f"{c['count']:,}"] for c in h.get("cases", [])])
    if h.get("steps"):
        out += (f"\n\nPer step, {h.get('steps_case')} (each timer adds ~0.3 µs; a step "
                "with dots runs inside the next step below it with fewer dots):\n\n")
        out += table(["step", "p50 µs", "mean µs"],
                     [[s["step"].replace("  ", "· "), f"{s['p50_us']:.2f}",
                       f"{s['mean_us']:.2f}"] for s in h["steps"]])
    return out


def render(r: Results) -> str:
    m = r.meta
    parts = [
        f"# tensord benchmark — {m.get('started', '')[:16]} on {m.get('host')}",
        f"{m.get('profile')} profile, {m.get('wall_s')} s wall; {m.get('cpu')}, "
        f"{m.get('cores')} cores, {m.get('memory')}, Linux {m.get('kernel')}, clocksource "
        f"{m.get('clocksource')}; {m.get('go')}; Python {m.get('python')}, torch "
        f"{m.get('torch')}, grpcio {m.get('grpcio')}, Flask {m.get('flask')}, gunicorn "
        f"{m.get('gunicorn')}; commit {m.get('commit')}{' (dirty tree)' if m.get('dirty') else ''};"
        f" spin budget {m.get('spin_us')} µs. Other work on the machine: CPUs "
        f"{100 * m.get('cpu_busy_before', 0):.0f}% busy just before the start, load average "
        f"{(m.get('loadavg_before') or ['?'])[0]} before / {(m.get('loadavg_after') or ['?'])[0]}"
        " after (the run's own processes included). All latencies are round trips in µs unless "
        "marked.",
        "## Native serving core targets (issue 16)", targets_table(native_targets(r)),
        "## Data plane v2 targets", targets_md(r),
        "## Floors", floors_md(r),
        "## 4 KiB round trip (identity, one caller): the headline", headline_md(r),
        "## p50 latency by payload (identity, one caller)", latency_md(r, "p50_us"),
        "## p99 latency by payload (identity, one caller)", latency_md(r, "p99_us"),
        "## How many times faster tensord is (baseline p50 ÷ tensord p50)", versus_md(r),
        "## Large payloads (identity; one-way = 2 × payload ÷ round trip)", bandwidth_md(r),
        "## MLP (16→64→4), p50 by batch", mlp_md(r),
        "## Throughput vs concurrent callers (identity, 4 KiB)", conc_md(r),
    ]
    if r.brounds or r.batching.get("skipped"):
        parts += ["## Batching targets", targets_table(batching_targets(r)),
                  "## Dynamic batching, per case and variant (median over interleaved rounds; "
                  "daemon stats over each point's timed phase)", batching_md(r)]
    if r.grounds:
        parts += ["## Gateway targets", targets_table(gateway_targets(r)),
                  "## tensord-gateway vs the baselines (identity, one caller; median over "
                  "interleaved rounds; CPU per call from schedstat of each server's process "
                  "group and the load generator's rusage)", gateway_md(r)]
    if r.idle:
        parts += ["## Idle daemon (blocking, spin_us = 0)", idle_md(r)]
    if r.gobench:
        parts += ["## Go client: go test -run XXX -bench . -benchmem (go/shmclient)",
                  gobench_md(r)]
    if r.hotpath.get("cases"):
        parts += ["## The daemon's hot path, in-process (take + execute per request)",
                  hotpath_md(r)]
    if r.errors:
        parts += ["## Errors", "\n".join(f"- `{json.dumps(e)[:300]}`" for e in r.errors)]
    return "\n\n".join(parts) + "\n"


# -- plots -----------------------------------------------------------------------------------


def plots(r: Results, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, lb in enumerate(r.labels):
        styles[lb] = dict(color=colors[i % len(colors)], marker="o", markersize=3,
                          linestyle="--" if "spin" in lb else "-")
    made = []
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, field, title in ((axes[0], "p50_us", "p50"), (axes[1], "p99_us", "p99")):
        for lb in r.labels:
            pts = [(s, r.get(lb, size=s)) for s in r.sizes("identity")]
            pts = [(s, p[field]) for s, p in pts if p]
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], label=lb, **styles[lb])
        for k, name, ls in (("eventfd", "eventfd floor", ":"),
                            ("eventfd-idle", "idle eventfd floor", "--"),
                            ("spin", "spinning floor", "-.")):
            f = r.floor.get(k)
            if f and f[field] > 0:
                ax.axhline(f[field], color="grey", linestyle=ls, linewidth=1,
                           label=f"{name} ({us(f[field])} µs)")
        mc = [(s, f[field]) for s, f in sorted(r.memcpy.items())
              if s in r.sizes("identity") and f[field] > 0]
        if mc:
            ax.plot([s for s, _ in mc], [2 * v for _, v in mc], color="black", linestyle=":",
                    linewidth=1, label="2 × memcpy (one copy each way)")
        ax.set_xscale("log", base=2)
        ticks = r.sizes("identity")
        ax.set_xticks(ticks, [size_name(t).replace(" ", "\n") for t in ticks])
        ax.set_yscale("log")
        ax.set_xlabel("payload (bytes of float32, each way)")
        ax.set_ylabel(f"{title} round trip (µs)")
        ax.set_title(f"identity model, one caller: {title}")
        ax.grid(True, which="both", alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"{r.meta.get('host')} · {r.meta.get('cores')} cores · "
                 f"{r.meta.get('started', '')[:16]} · {r.meta.get('profile')}")
    fig.tight_layout()
    p = Path(f"{stem}-latency.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(p)

    cells = conc_cells(r)
    if cells:
        fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
        for ax, mode in zip(axes, ("goroutines", "processes")):
            for lb in r.labels:
                xs, ys = [], []
                for c in sorted({c for c, _ in cells}):
                    p = r.get(lb, callers=c, mode=mode if c > 1 else "goroutines")
                    if p:
                        xs.append(c)
                        ys.append(p["throughput_rps"])
                if xs:
                    ax.plot(xs, ys, label=lb, **styles[lb])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks([1, 8, 64], ["1", "8", "64"])
            ax.set_xlabel(f"concurrent callers ({mode})")
            ax.set_ylabel("requests / s")
            ax.set_title(f"identity 4 KiB, callers as {mode}")
            ax.grid(True, which="both", alpha=0.3)
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(fontsize=8)
        fig.tight_layout()
        p = Path(f"{stem}-throughput.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made


BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def splice_readme(readme: Path, md: str, pngs: list[Path]) -> None:
    """Put the run's tables and plots between the README's results markers."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} markers")
    body = md.split("\n", 1)[1].replace("\n## ", "\n### ")  # demote headings under the README's
    links = "\n\n".join(f"![{p.stem}](results/{p.name})" for p in pngs)
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{body.strip()}\n\n{links}\n{END}{tail}")


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--readme"]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(args[0])
    r = Results(json.loads(path.read_text()))
    stem = path.with_suffix("")
    md = Path(f"{stem}.md")
    text = render(r)
    md.write_text(text)
    pngs = plots(r, stem)
    made = [md] + pngs
    if "--readme" in sys.argv:
        readme = Path(__file__).resolve().parent / "README.md"
        splice_readme(readme, text, pngs)
        made.append(readme)
    print("report: wrote " + ", ".join(str(p) for p in made), file=sys.stderr)
    for t, m, want, ok in (native_targets(r) + targets(r) + batching_targets(r)
                           + gateway_targets(r)):
        mark = "----" if ok is None else "MET " if ok else "MISS"
        print(f"  target {mark} {t} ({want}): {m}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

