"""The outage a Go caller sees when the daemon is restarted (issue 17 item 6): the gap between
each caller's last answer before a restart and its first answer after it, for a zero-downtime
`tensord upgrade` and for the plain way (SIGTERM, then a new daemon loads its models).

    .venv/bin/python bench/restart_gap.py [--restarts 5] [--workers 8] [--config FILE]

Builds bench/bin/restartgap (cmd/restartgap), starts a daemon on a temporary socket, runs the
callers (each call with a 1 s deadline, default client options) and restarts the daemon
`--restarts` times each way. For each restart and caller the gap is the longest interval
between two consecutive answers from the restart's start until 2 s after it ended; reported
are the p50, p99 and max over callers and restarts, and the calls that failed. Results go to
bench/results/<date>-restart.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = ROOT / ".venv" / "bin" / "python"
BIN = BENCH / "bin" / "restartgap"
AFTER = 2.0  # seconds after a restart ends that still count as its window


def start_daemon(sock: str, config: str | None, log) -> subprocess.Popen:
    cmd = [str(PY), "-m", "tensord", "serve", "--socket", sock]
    if config:
        cmd += ["--config", config]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_listening(sock, proc)
    return proc


def wait_listening(sock: str, proc: subprocess.Popen | None, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(sock)
            return
        time.sleep(0.05)
    raise RuntimeError("the daemon did not listen")


def pids_serving(sock: str) -> set[int]:
    """tensord processes started for this socket (an upgrade's successors included)."""
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
            if b"serve" in argv and sock.encode() in argv:
                out.add(int(pid))
    return out


def run(mode: str, restarts: int, workers: int, config: str | None, tmp: Path) -> dict:
    sock = str(tmp / f"{mode}.sock")
    log = open(tmp / f"{mode}.log", "w")
    daemon = start_daemon(sock, config, log)
    gen = subprocess.Popen([str(BIN), "-socket", sock, "-workers", str(workers),
                            "-deadline", "1s"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
    assert gen.stdout.readline().strip() == "READY"
    t0 = time.time()
    windows = []
    try:
        time.sleep(1.0)
        for _ in range(restarts):
            start = time.time()
            if mode == "upgrade":
                r = subprocess.run([str(PY), "-m", "tensord", "upgrade", "--socket", sock],
                                   capture_output=True, text=True, timeout=300)
                if r.returncode:
                    raise RuntimeError(f"upgrade failed: {r.stderr}")
            else:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(60)
                daemon = start_daemon(sock, config, log)
            end = time.time()
            windows.append((start - t0, end - t0 + AFTER))
            time.sleep(AFTER + 1.0)
    finally:
        out, _ = gen.communicate(input="", timeout=120)
        for pid in pids_serving(sock):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + 60
        while pids_serving(sock) and time.monotonic() < end:
            time.sleep(0.1)
        log.close()
    rep = json.loads(out)
    shift = (rep["start_unix_ns"] / 1e9) - t0  # the generator's clock vs ours
    gaps = []
    for lo, hi in windows:
        for answers in rep["answers"]:
            ts = [a / 1e9 + shift for a in answers]
            inside = [t for t in ts if lo <= t <= hi]
            before = [t for t in ts if t < lo][-1:]
            after = [t for t in ts if t > hi][:1]
            seq = before + inside + after
            gaps.append(max((b - a for a, b in zip(seq, seq[1:])), default=hi - lo))
    gaps.sort()

    def pct(p: float) -> float:
        return gaps[min(len(gaps) - 1, int(p * len(gaps)))] * 1e3

    return {"mode": mode, "restarts": restarts, "workers": workers, "calls": rep["calls"],
            "failed": len(rep["errors"] or []), "first_errors": (rep["errors"] or [])[:3],
            "gap_ms": {"p50": pct(0.50), "p99": pct(0.99), "max": gaps[-1] * 1e3}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--config", help="daemon config (default: the built-in models only)")
    ap.add_argument("--modes", default="upgrade,sigterm")
    args = ap.parse_args()
    subprocess.run(["go", "build", "-o", str(BIN), "./cmd/restartgap"], cwd=BENCH, check=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="tensord-restart-") as d:
        for mode in args.modes.split(","):
            r = run(mode, args.restarts, args.workers, args.config, Path(d))
            results.append(r)
            print(json.dumps(r), flush=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    host = platform.node() or "host"
    out = BENCH / "results" / f"{stamp}-{host}-restart"
    meta = {"when": stamp, "host": host, "cpus": os.cpu_count(), "config": args.config,
            "results": results}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = ["| restart | callers x restarts | calls | failed | gap p50 ms | gap p99 ms | "
             "gap max ms |", "|---|---|---|---|---|---|---|"]
    for r in results:
        g = r["gap_ms"]
        lines.append(f"| {r['mode']} | {r['workers']} x {r['restarts']} | {r['calls']} | "
                     f"{r['failed']} | {g['p50']:.1f} | {g['p99']:.1f} | {g['max']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
