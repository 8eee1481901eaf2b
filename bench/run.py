"""Runs the whole benchmark: floors, then each server in turn with the Go load generator
against it, then the report. Started by bench/run.sh (which sets up the venv and builds
bench/bin/loadgen); see bench/README.md.

Every server is started here, in its own process group, and stopped here (SIGTERM, then
SIGKILL after a grace period) whatever happens; at the end the run checks that nothing it
started is still running and that it left nothing in /dev/shm."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = ROOT / ".venv" / "bin" / "python"
LOADGEN = BENCH / "bin" / "loadgen"
SERVERS = BENCH / "servers"

KiB, MiB = 1 << 10, 1 << 20
HEADLINE = 4 * KiB  # the payload of the targets


@dataclass
class Profile:
    """How much to measure. Times are per point; every point is also bounded by count."""

    name: str
    sizes: list[int]
    http_max: int  # JSON of larger tensors takes seconds per request
    mlp_sizes: list[int]
    conc_sizes: list[int]
    callers: list[int]
    warmup: float
    duration: float
    max_iters: int
    hard_cap: float
    floor_duration: float
    memcpy_duration: float
    spin_us: int
    headline_rounds: int  # interleaved 4 KiB rounds (all servers up at once)
    headline_duration: float


QUICK = Profile(
    name="quick",
    sizes=[16, 256, 4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB],
    http_max=1 * MiB,
    mlp_sizes=[64, 4 * KiB, 1 * MiB],
    conc_sizes=[4 * KiB],
    callers=[1, 8, 64],
    warmup=0.2, duration=0.7, max_iters=20000, hard_cap=6.0,
    floor_duration=1.0, memcpy_duration=0.3, spin_us=100,
    headline_rounds=3, headline_duration=0.5,
)

FULL = Profile(
    name="full",
    sizes=[16, 256, 1 * KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB,
           16 * MiB, 64 * MiB],
    http_max=16 * MiB,
    mlp_sizes=[64, 4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB],
    conc_sizes=[4 * KiB, 256 * KiB],
    callers=[1, 8, 64],
    warmup=0.5, duration=3.0, max_iters=200000, hard_cap=30.0,
    floor_duration=3.0, memcpy_duration=1.0, spin_us=100,
    headline_rounds=7, headline_duration=1.0,
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- servers ---------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    argv: list[str]
    ready: object  # callable returning True once the server answers
    cwd: Path = ROOT
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    pids: set[int] = field(default_factory=set)

    def start(self, workdir: Path, timeout: float = 120.0) -> None:
        self.log_path = workdir / f"{self.name}.log"
        logf = open(self.log_path, "wb")
        log(f"starting {self.name}: {' '.join(self.argv)}")
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, stdout=logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        logf.close()
        self.pids.add(self.proc.pid)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + self.tail())
            with contextlib.suppress(OSError):
                if self.ready():
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not become ready in {timeout:.0f} s:\n" + self.tail())

    def tail(self, n: int = 30) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the server's own process group (it and its workers), SIGKILL after
        `grace` seconds."""
        p = self.proc
        if p is None:
            return
        self.proc = None
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for {grace:.0f} s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        # Workers of the group (gunicorn's) that outlived their parent.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        log(f"stopped {self.name}")


def unix_ready(path: str):
    def check() -> bool:
        if not os.path.exists(path):
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(1)
            s.connect(path)
            return True
        finally:
            s.close()
    return check


def http_ready(url: str):
    def check() -> bool:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    return check


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# -- the matrix ------------------------------------------------------------------------------


def points(prof: Profile, label: str, transport: str, addr: str, spin_us: int,
           max_size: int | None = None) -> list[dict]:
    out = []

    def add(model: str, size: int, callers: int, mode: str) -> None:
        out.append({
            "transport": transport, "label": label, "addr": addr,
            "spin_ns": spin_us * 1000, "model": model, "size": size, "callers": callers,
            "mode": mode, "warmup_ns": int(prof.warmup * 1e9),
            "duration_ns": int(prof.duration * 1e9), "min_iters": 5,
            "max_iters": prof.max_iters, "hard_cap_ns": int(prof.hard_cap * 1e9),
        })

    for s in prof.sizes:
        if max_size is None or s <= max_size:
            add("identity", s, 1, "goroutines")
    for s in prof.mlp_sizes:
        if max_size is None or s <= max_size:
            add("mlp", s, 1, "goroutines")
    for s in prof.conc_sizes:
        for mode in ("goroutines", "processes"):
            for c in prof.callers:
                if c == 1 and (mode == "processes" or s in prof.sizes):
                    continue  # one caller: the same as the size sweep's point
                add("identity", s, c, mode)
    return out


def run_loadgen(args: list[str], timeout: float, stdin: str | None = None) -> list[dict]:
    """Run loadgen; its stdout is JSON lines, its stderr a progress log passed through."""
    p = subprocess.Popen([str(LOADGEN), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=None, text=True, start_new_session=True)
    out = ""
    try:
        out, _ = p.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"loadgen {args[0]} ran past {timeout:.0f} s; stopping it")
        out = _stop_group(p)
    except BaseException:
        _stop_group(p)  # interrupted: loadgen and its workers go too
        raise
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)  # worker processes left behind, if any
    rows = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))
    if p.returncode not in (0, None):
        log(f"loadgen {args[0]} exited with {p.returncode}")
    return rows


def _stop_group(p: subprocess.Popen) -> str:
    """SIGTERM to loadgen's process group (loadgen cancels its workers), SIGKILL after 10 s."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGTERM)
    try:
        out, _ = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
    return out or ""


def point_budget(pts: list[dict]) -> float:
    """A generous wall-clock bound for a list of points (each is bounded by its hard cap)."""
    return sum(p["warmup_ns"] / 1e9 + p["hard_cap_ns"] / 1e9 + 10 for p in pts) + 60


def measure(server: Server, workdir: Path, pts: list[dict], results: list, errors: list) -> None:
    try:
        server.start(workdir)
    except RuntimeError as e:
        log(str(e))
        errors.append({"server": server.name, "error": str(e)})
        server.stop()
        return
    try:
        path = workdir / f"points-{server.name}.json"
        path.write_text(json.dumps(pts))
        for row in run_loadgen(["run", "--points", str(path)], point_budget(pts)):
            if "error" in row:
                errors.append(row)
            else:
                results.append(row)
    finally:
        server.stop()


Label = tuple[str, str, str, int, int | None]  # label, transport, addr, spin µs, max payload


def server_specs(workdir: Path, spin_us: int, want, prof: Profile) -> list[tuple[Server,
                                                                                list[Label]]]:
    """Every server of the run and the transports (labels) measured against it."""
    specs = []
    modes = ([("block", 0)] if want("tensord") else []) + \
        ([(f"spin{spin_us}us", spin_us)] if want("tensord-spin") else [])
    for tag, spin in modes:
        sock = str(workdir / f"tensord-{tag}.sock")
        cfg = workdir / f"tensord-{tag}.toml"
        cfg.write_text(f"[daemon]\nspin_us = {spin}\nmax_sessions = 256\n")
        srv = Server(f"tensord-{tag}", [str(PY), "-m", "tensord", "serve", "--socket", sock,
                                        "--config", str(cfg), "--log-level", "WARNING"],
                     unix_ready(sock))
        specs.append((srv, [(f"tensord-copy/{tag}", "tensord-copy", sock, spin, None),
                            (f"tensord-zerocopy/{tag}", "tensord-zerocopy", sock, spin, None)]))
    if want("msgpack"):
        sock = str(workdir / "msgpack.sock")
        specs.append((Server("msgpack-uds", [str(PY), str(SERVERS / "msgpack_server.py"),
                                             "--socket", sock], unix_ready(sock)),
                       [("msgpack-uds", "msgpack-uds", sock, 0, None)]))
    if want("grpc"):
        sock = str(workdir / "grpc.sock")
        specs.append((Server("grpc", [str(PY), str(SERVERS / "grpc_server.py"), "--socket", sock,
                                      "--threads", "8"], unix_ready(sock)),
                      [("grpc-uds", "grpc", sock, 0, None)]))
    if want("http"):
        addr = f"127.0.0.1:{free_port()}"
        specs.append((Server("http-json", [str(ROOT / ".venv" / "bin" / "gunicorn"), "-w", "1",
                                           "-k", "gthread", "--threads", "8", "-b", addr,
                                           "--timeout", "120", "--log-level", "warning",
                                           "--chdir", str(SERVERS), "http_app:app"],
                             http_ready(f"http://{addr}/v2/health/ready")),
                      [("http-json", "http-json", addr, 0, prof.http_max)]))
    return specs


def run_headline(prof: Profile, specs, workdir: Path, errors: list) -> tuple[list, list]:
    """The 4 KiB comparison the targets are about, interleaved: every server runs at once
    (idle ones cost next to nothing), and each round measures the floors and then every
    transport one after the other, in alternating order, so a change in background load
    during the run hits them all alike. The report takes the median over rounds."""
    rows: list[dict] = []
    floor_rows: list[dict] = []
    started = []
    try:
        for srv, _ in specs:
            srv.start(workdir)
            started.append(srv)
        labels = [lb for _, lbs in specs for lb in lbs]
        for r in range(1, prof.headline_rounds + 1):
            log(f"headline round {r}/{prof.headline_rounds}")
            for f in run_loadgen(["floors", "--peer", f"{PY} {SERVERS / 'floor_peer.py'}",
                                  "--only", "sem,sem-idle,spin",
                                  "--duration", f"{prof.headline_duration}s"], timeout=120):
                f["round"] = r
                floor_rows.append(f)
            order = labels if r % 2 else labels[::-1]
            pts = []
            for label, transport, addr, spin, _ in order:
                pts += [dict(p, phase="headline", round=r, duration_ns=int(
                    prof.headline_duration * 1e9)) for p in points(
                        Profile(**{**prof.__dict__, "sizes": [HEADLINE], "mlp_sizes": [],
                                   "conc_sizes": []}), label, transport, addr, spin)]
            path = workdir / f"headline-{r}.json"
            path.write_text(json.dumps(pts))
            for row in run_loadgen(["run", "--points", str(path)], point_budget(pts)):
                (errors if "error" in row else rows).append(row)
    except RuntimeError as e:  # a server that would not start
        log(str(e))
        errors.append({"phase": "headline", "error": str(e)})
    finally:
        for srv in started:
            srv.stop()
    return rows, floor_rows


# -- cleanliness -----------------------------------------------------------------------------


def shm_entries() -> set[str]:
    with contextlib.suppress(FileNotFoundError):
        return set(os.listdir("/dev/shm"))
    return set()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat): what else is running."""
    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + vals[4]  # idle + iowait
        return sum(vals), idle

    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // (1024 * 1024)} GiB"
                break

    def cmd(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                  cwd=ROOT).stdout.strip()
        except OSError:
            return ""

    versions = cmd(str(PY), "-c",
                   "import torch, grpc, flask, gunicorn, msgpack, posix_ipc, sys;"
                   "print(sys.version.split()[0], torch.__version__, grpc.__version__,"
                   " flask.__version__, gunicorn.__version__,"
                   " '.'.join(map(str, msgpack.version)), posix_ipc.VERSION)").split()
    names = ["python", "torch", "grpcio", "flask", "gunicorn", "msgpack", "posix_ipc"]
    return {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "clocksource": Path("/sys/devices/system/clocksource/clocksource0/"
                            "current_clocksource").read_text().strip()
        if Path("/sys/devices/system/clocksource/clocksource0/current_clocksource").exists()
        else "",
        "go": cmd("go", "version"),
        "commit": cmd("git", "rev-parse", "--short", "HEAD"),
        "dirty": bool(cmd("git", "status", "--porcelain")),
        **dict(zip(names, versions)),
    }


# -- main ------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a few minutes (the default)")
    g.add_argument("--full", action="store_true", help="more sizes, longer points")
    ap.add_argument("--only", default="", help="comma-separated phases (floors, headline, "
                    "sweep) and/or servers (tensord, tensord-spin, msgpack, grpc, http)")
    ap.add_argument("--spin-us", type=int, default=None,
                    help="spin budget of the spin-then-block runs "
                    "(daemon spin_us and Go WithSpin)")
    ap.add_argument("--out", default=str(BENCH / "results"), help="results directory")
    ap.add_argument("--readme", action="store_true",
                    help="also put this run's tables and plots into bench/README.md")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                    help="first wait up to this long for the machine to be idle (<10%% busy)")
    args = ap.parse_args()
    prof = FULL if args.full else QUICK
    spin_us = args.spin_us if args.spin_us is not None else prof.spin_us
    only = {s for s in args.only.split(",") if s}
    phases, kinds = {"floors", "headline", "sweep"}, {"tensord", "tensord-spin", "msgpack",
                                                      "grpc", "http"}
    if only - phases - kinds:
        ap.error(f"--only: unknown {sorted(only - phases - kinds)}")

    def want(k: str) -> bool:
        """Phases and servers filter separately: naming only servers runs every phase."""
        group = phases if k in phases else kinds
        return not (only & group) or k in only

    if not LOADGEN.exists():
        log(f"{LOADGEN} is missing: run bench/run.sh, which builds it")
        return 1
    busy = cpu_busy()
    end = time.monotonic() + args.wait_idle
    while busy > 0.10 and time.monotonic() < end:
        log(f"machine {100 * busy:.0f}% busy; waiting for it to go idle")
        busy = cpu_busy(2.0)
    started = dt.datetime.now()
    load_before = os.getloadavg()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tdbench-"))
    shm_before = shm_entries()
    results: list[dict] = []
    errors: list[dict] = []
    floors: list[dict] = []

    def on_term(*_) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    log(f"{prof.name} run; scratch files in {workdir}; CPUs {100 * busy:.0f}% busy before "
        "the start (other work on this machine skews every number: run it on a quiet machine)")
    specs = server_specs(workdir, spin_us, want, prof)
    servers = [srv for srv, _ in specs]
    headline: list[dict] = []
    headline_floors: list[dict] = []
    try:
        if want("floors"):
            log("floors: semaphore ping-pong, busy-poll ping-pong, memcpy")
            floors = run_loadgen(
                ["floors", "--peer", f"{PY} {SERVERS / 'floor_peer.py'}",
                 "--duration", f"{prof.floor_duration}s",
                 "--memcpy-duration", f"{prof.memcpy_duration}s",
                 "--sizes", ",".join(str(s) for s in sorted(set(prof.sizes + prof.mlp_sizes)))],
                timeout=120 + 20 * len(prof.sizes))
        if want("headline") and prof.headline_rounds and specs:
            headline, headline_floors = run_headline(prof, specs, workdir, errors)
        for srv, labels in specs if want("sweep") else []:
            pts = []
            for label, transport, addr, spin, max_size in labels:
                pts += points(prof, label, transport, addr, spin, max_size=max_size)
            measure(srv, workdir, pts, results, errors)
    except KeyboardInterrupt:
        log("interrupted; stopping every server")
        errors.append({"error": "interrupted"})
    finally:
        for s in servers:
            s.stop()

    # Nothing of ours may outlive the run.
    strays = [(s.name, pid) for s in servers for pid in s.pids if alive(pid)]
    left = sorted(shm_entries() - shm_before)
    ours = [e for e in left if "tensord-" in e or "tdbench-" in e]
    if strays:
        errors.append({"error": f"processes still running after stop: {strays}"})
    if ours:
        errors.append({"error": f"left in /dev/shm: {ours}"})
    log(f"clean-up check: {len(strays)} stray processes, {len(ours)} new /dev/shm entries")

    meta = machine()
    meta.update({"profile": prof.name, "spin_us": spin_us, "started": started.isoformat(),
                 "finished": dt.datetime.now().isoformat(),
                 "wall_s": round((dt.datetime.now() - started).total_seconds(), 1),
                 "cpu_busy_before": round(busy, 3),
                 "loadavg_before": [round(x, 2) for x in load_before],
                 "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                 "servers": {s.name: " ".join(s.argv) for s in servers}})
    host = meta["host"].split(".")[0] or "host"
    stem = f"{started:%Y%m%d-%H%M}-{host}"
    if prof.name != "quick":
        stem += f"-{prof.name}"
    doc = {"meta": meta, "floors": floors, "headline": headline,
           "headline_floors": headline_floors, "points": results, "errors": errors}
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=1))
    log(f"wrote {json_path} ({len(results)} points, {len(errors)} errors)")
    report = subprocess.run([str(PY), str(BENCH / "report.py"), str(json_path),
                             *(["--readme"] if args.readme else [])], cwd=ROOT)
    shutil.rmtree(workdir, ignore_errors=True)
    for e in errors:
        log(f"error: {json.dumps(e)[:400]}")
    return 0 if report.returncode == 0 and not strays and not ours else 1


if __name__ == "__main__":
    sys.exit(main())
