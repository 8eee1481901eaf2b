"""Turns a results JSON (from bench/run.py) into markdown tables and PNG plots beside it:

    <stem>.md              every table: floors, latency by size, 4 KiB detail, bandwidth,
                           MLP, throughput vs concurrency, the targets
    <stem>-latency.png     p50 and p99 latency vs payload size, one line per transport
    <stem>-throughput.png  throughput vs concurrent callers (goroutines, processes)

    python bench/report.py bench/results/<stem>.json [--readme]

--readme also replaces the generated part of bench/README.md (between its results markers)
with these tables and links to these plots."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import median

ORDER = ["tensord-copy/block", "tensord-zerocopy/block", "tensord-copy/spin",
         "tensord-zerocopy/spin", "msgpack-uds", "grpc-uds", "http-json"]
BASELINES = ["msgpack-uds", "grpc-uds", "http-json"]
HEADLINE = 4096
BIG = 64 << 20


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
        # Interleaved 4 KiB rounds: per label (and floor) the list of per-round results.
        self.rounds: dict[str, list[dict]] = defaultdict(list)
        for p in doc.get("headline", []):
            self.rounds[p["label"]].append(p)
        self.floor_rounds: dict[str, list[dict]] = defaultdict(list)
        for f in doc.get("headline_floors", []):
            self.floor_rounds[f["floor"]].append(f)

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
    names = {"sem": "blocking: Go↔Python semaphore ping-pong, back to back",
             "sem-idle": "blocking, both sides idle 1 ms before each round",
             "spin": "spinning: Go↔Python busy-poll ping-pong"}
    for k in ("sem", "sem-idle", "spin"):
        f = r.floor.get(k)
        if f:
            rows.append([names[k], us(f["p50_us"]), us(f["p90_us"]), us(f["p99_us"]),
                         us(f["p999_us"]), us(f["max_us"]), us(f["mean_us"]), f"{f['count']:,}"])
    for k in ("sem", "sem-idle", "spin"):
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
    sem, idle, spin = (r.head_floor(k) for k in ("sem", "sem-idle", "spin"))
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
                         "÷ blocking floor", "÷ idle blocking floor", "÷ spinning floor",
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


def targets(r: Results) -> list[tuple[str, str, bool | None]]:
    out = []
    blk, zcb = r.first("tensord-copy/block"), r.first("tensord-zerocopy/block")
    spn, zcs = r.first("tensord-copy/spin"), r.first("tensord-zerocopy/spin")
    sem, idle, spin = (r.head_floor(k) for k in ("sem", "sem-idle", "spin"))

    def best(*labels):
        vals = [(r.head(lb), lb) for lb in labels if lb and r.head(lb)]
        return min(vals) if vals else (None, None)

    b, blb = best(blk, zcb)
    if b and sem:
        also = f"; {b / idle:.1f}× the {dur(idle)} idle floor" if idle else ""
        out.append(("4 KiB p50, blocking ≤ 1.5× blocking floor",
                    f"{dur(b)} ({blb}) = {b / sem:.1f}× the {dur(sem)} floor{also}",
                    b / sem <= 1.5))
    s, slb = best(spn, zcs)
    if s and spin:
        out.append(("4 KiB p50, spin-then-block ≤ 20× spinning floor",
                    f"{dur(s)} ({slb}) = {s / spin:.0f}× the {dur(spin)} floor",
                    s / spin <= 20))
    best_t, tlb = best(blk, zcb, spn, zcs)
    for base, want in (("grpc-uds", 20), ("http-json", 100)):
        g = r.head(base)
        if g and best_t:
            out.append((f"4 KiB p50 ≥ {want}× faster than {base}",
                        f"{base} {dur(g)} ÷ {dur(best_t)} ({tlb}) = {g / best_t:.1f}×",
                        g / best_t >= want))
    mc = r.memcpy.get(BIG)
    z = r.p50(zcb, size=BIG) if zcb else None
    zs = r.p50(zcs, size=BIG) if zcs else None
    cand = [(v, lb) for v, lb in ((z, zcb), (zs, zcs)) if v]
    if cand and mc:
        v, lb = min(cand)
        bw = 2 * BIG / (v * 1e3)
        out.append(("64 MiB one-way bandwidth, zero-copy ≥ 50 % of memcpy",
                    f"{bw:.2f} GB/s ({lb}; 2 × 64 MiB ÷ p50 round trip {dur(v)}) = "
                    f"{100 * bw / mc['gbps']:.0f} % of memcpy {mc['gbps']:.2f} GB/s",
                    bw / mc["gbps"] >= 0.5))
    return out


def targets_md(r: Results) -> str:
    return table(["target", "measured (same run)", "met?"],
                 [[t, m, "yes" if ok else "**no**"] for t, m, ok in targets(r)])


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
        "## Targets", targets_md(r),
        "## Floors", floors_md(r),
        "## 4 KiB round trip (identity, one caller): the headline", headline_md(r),
        "## p50 latency by payload (identity, one caller)", latency_md(r, "p50_us"),
        "## p99 latency by payload (identity, one caller)", latency_md(r, "p99_us"),
        "## How many times faster tensord is (baseline p50 ÷ tensord p50)", versus_md(r),
        "## Large payloads (identity; one-way = 2 × payload ÷ round trip)", bandwidth_md(r),
        "## MLP (16→64→4), p50 by batch", mlp_md(r),
        "## Throughput vs concurrent callers (identity, 4 KiB)", conc_md(r),
    ]
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
        for k, name, ls in (("sem", "blocking floor", ":"),
                            ("sem-idle", "idle blocking floor", "--"),
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
    for t, m, ok in targets(r):
        print(f"  target {'MET ' if ok else 'MISS'} {t}: {m}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

