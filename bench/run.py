"""Runs the whole benchmark: floors, then each server in turn with the Go load generator
against it, then the report. Started by bench/run.sh (which sets up the venv and builds
bench/bin/loadgen); see bench/README.md.

Every server is started here, in its own process group, and stopped here (SIGTERM, then
SIGKILL after a grace period) whatever happens; at the end the run checks that nothing it
started is still running and that it left nothing in /dev/shm.

Phases: floors (eventfd and busy-poll ping-pong, memcpy), headline (interleaved 4 KiB
rounds), sweep (every server's matrix), idle (a daemon's CPU with 200 idle sessions),
gobench (go/shmclient's Go benchmarks), hotpath (the daemon's per-request work,
in-process: profile_daemon.py), batching (dynamic batching on and off: mlp and
EfficientNet-Lite0, overhead at one caller, fairness under a flood), gateway
(tensord-gateway's HTTP and gRPC against Flask+JSON and gRPC-UDS)."""

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
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = ROOT / ".venv" / "bin" / "python"
LOADGEN = BENCH / "bin" / "loadgen"
GATEWAY = BENCH / "bin" / "tensord-gateway"  # built by run.sh from go/cmd/tensord-gateway
SERVERS = BENCH / "servers"
EXAMPLES = ROOT / "daemon" / "tensord" / "examples" / "models.toml"
IMAGE = ROOT / "tests" / "data" / "chelsea.jpg"  # 451x300 JPEG, 35 KB

KiB, MiB = 1 << 10, 1 << 20
HEADLINE = 4 * KiB  # the payload of the targets
MLP_ROW = 64  # mlp's input at one row: f32 [1, 16]
IDLE_SESSIONS, IDLE_PROCS = 200, 4


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
    idle_seconds: float = 5.0  # the idle-daemon CPU sample
    hotpath_n: int = 20000  # requests per case of profile_daemon.py
    batch_rounds: int = 3  # interleaved rounds of the batching phase
    image_warmup: float = 1.0  # EfficientNet points: per caller
    image_duration: float = 3.0
    gateway_rounds: int = 3  # interleaved rounds of the gateway phase
    gateway_sizes: tuple = (4 * KiB, 1 * MiB)


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
    headline_rounds=7, headline_duration=1.0, idle_seconds=10.0, hotpath_n=100000,
    batch_rounds=5, image_warmup=2.0, image_duration=8.0, gateway_rounds=5,
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
    addr: str = ""
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


# Every bench client runs as this one uid: the per-uid shares (a quarter of max_sessions and
# of the memory, issue 19.7) would refuse the idle phase's 200 sessions.
ONE_UID = "max_sessions_per_uid = 0\nmax_memory_per_uid = 0\n"


def tensord_server(workdir: Path, tag: str, spin_us: int) -> Server:
    sock = str(workdir / f"tensord-{tag}.sock")
    cfg = workdir / f"tensord-{tag}.toml"
    cfg.write_text(f"[daemon]\nspin_us = {spin_us}\nmax_sessions = 256\n{ONE_UID}")
    return Server(f"tensord-{tag}", [str(PY), "-m", "tensord", "serve", "--socket", sock,
                                     "--config", str(cfg), "--log-level", "WARNING"],
                  unix_ready(sock), addr=sock)


def server_specs(workdir: Path, spin_us: int, want, prof: Profile) -> list[tuple[Server,
                                                                                list[Label]]]:
    """Every server of the run and the transports (labels) measured against it."""
    specs = []
    modes = ([("block", 0)] if want("tensord") else []) + \
        ([(f"spin{spin_us}us", spin_us)] if want("tensord-spin") else [])
    for tag, spin in modes:
        srv = tensord_server(workdir, tag, spin)
        sock = srv.addr
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
        labels = []
        for srv, lbs in specs:
            try:
                srv.start(workdir)
            except RuntimeError as e:  # measure the others; the error goes in the report
                log(str(e))
                errors.append({"phase": "headline", "server": srv.name, "error": str(e)})
                srv.stop()
                continue
            started.append(srv)
            labels += lbs
        for r in range(1, prof.headline_rounds + 1):
            log(f"headline round {r}/{prof.headline_rounds}")
            for f in run_loadgen(["floors", "--peer", f"{PY} {SERVERS / 'floor_peer.py'}",
                                  "--only", "eventfd,eventfd-idle,spin",
                                  "--duration", f"{prof.headline_duration}s"], timeout=120):
                f["round"] = r
                floor_rows.append(f)
            order = labels if r % 2 else labels[::-1]
            pts = []
            for label, transport, addr, spin, _ in order:
                # mlp at one row (64 B) beside identity for tensord's blocking labels: the
                # cost of running a real model, measured in the same rounds.
                mlp = [MLP_ROW] if label.startswith("tensord") and spin == 0 else []
                pts += [dict(p, phase="headline", round=r, duration_ns=int(
                    prof.headline_duration * 1e9)) for p in points(
                        Profile(**{**prof.__dict__, "sizes": [HEADLINE], "mlp_sizes": mlp,
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


# -- dynamic batching ------------------------------------------------------------------------

MLP_PROCS, MLP_PER_PROC = 8, 8  # the mlp throughput point: 8 processes x 8 goroutines
IMAGE_CALLERS = (8, 32)
FLOOD = 64  # goroutines of the flooding session in the fairness points
EFFNET_BATCH, EFFNET_DELAY_US = 8, 2000


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string (no control characters here)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def model_toml(m: dict) -> str:
    """One [[models]] entry; nested tables (options) as [models.<key>]."""
    lines = ["[[models]]"] + [f"{k} = {toml_value(v)}" for k, v in m.items()
                              if not isinstance(v, dict)]
    for k, sub in m.items():
        if isinstance(sub, dict):
            lines += [f"[models.{k}]"] + [f"{kk} = {toml_value(vv)}" for kk, vv in sub.items()]
    return "\n".join(lines) + "\n"


def examples_available() -> str:
    """'' when the examples extra (EfficientNet-Lite0's weights) is installed, else why not."""
    p = subprocess.run([str(PY), "-c", "import tensord.examples.efficientnet as e; e.network"],
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        return ("the examples extra is not installed (TENSORD_EXTRAS=test,bench,examples bash "
                f"daemon/setup.sh): {last[:200]}")
    return ""


def batching_server(workdir: Path, variant: str, with_effnet: bool, threads: int = 0) -> Server:
    """A blocking daemon for one variant of the batching phase: the built-in mlp (batched:
    its default, up to 64 requests, no delay; unbatched: max_batch_size = 1) and, from the
    examples config, EfficientNet-Lite0 on the CPU (batched: 8 images, 2 ms delay;
    unbatched: max_batch_size = 1)."""
    batched = variant == "batched"
    sock = str(workdir / f"tensord-{variant}.sock")
    cfg = workdir / f"tensord-{variant}.toml"
    text = (f"[daemon]\nspin_us = 0\nmax_sessions = 256\n{ONE_UID}builtin_models = true\n"
            f"priority_uids = [{os.getuid()}]\n"
            f"threads = {threads}\n\n")
    text += model_toml({"name": "mlp", "source": "builtin",
                        "max_batch_size": 64 if batched else 1, "max_queue_delay_us": 0})
    if with_effnet:
        ex = tomllib.loads(EXAMPLES.read_text())
        eff = dict(next(m for m in ex["models"] if m["name"] == "efficientnet"))
        eff["device"] = "cpu"  # the CPU numbers; GPU targets are measured elsewhere
        if batched:
            eff.update(max_batch_size=EFFNET_BATCH, max_queue_delay_us=EFFNET_DELAY_US)
        else:
            eff.update(max_batch_size=1)
        text += "\n" + model_toml(eff)
    cfg.write_text(text)
    return Server(f"tensord-{variant}", [str(PY), "-m", "tensord", "serve", "--socket", sock,
                                         "--config", str(cfg), "--log-level", "WARNING"],
                  unix_ready(sock), addr=sock)


def batching_points(prof: Profile, variant: str, sock: str, rnd: int,
                    with_effnet: bool) -> list[dict]:
    """One round of one variant: mlp rows/s at 8x8, mlp at one caller, EfficientNet at 8
    and 32 callers, and (batched only) the fairness points."""
    base = {"transport": "tensord-copy", "addr": sock, "spin_ns": 0, "mode": "goroutines",
            "warmup_ns": int(prof.warmup * 1e9), "duration_ns": int(prof.duration * 1e9),
            "min_iters": 5, "max_iters": prof.max_iters * 4,
            "hard_cap_ns": int(prof.hard_cap * 1e9), "phase": "batching", "round": rnd,
            "variant": variant, "stats": sock}
    mlp = dict(base, model="mlp", size=MLP_ROW)
    pts = [dict(mlp, label="mlp-8x8", callers=MLP_PROCS, mode="processes",
                per_proc=MLP_PER_PROC),
           dict(mlp, label="mlp-1", callers=1, max_iters=prof.max_iters)]
    if with_effnet:
        for c in IMAGE_CALLERS:
            pts.append(dict(base, label=f"effnet-{c}", model="efficientnet", kind="image",
                            image=str(IMAGE), size=0, callers=c,
                            warmup_ns=int(prof.image_warmup * 1e9),
                            duration_ns=int(prof.image_duration * 1e9), min_iters=1,
                            # 32 queued images at up to ~1 s a pass (an oversubscribed CPU):
                            # each call may take that long (the call timeout is the cap)
                            hard_cap_ns=int(max(30, 4 * prof.image_duration) * 1e9)))
    if variant == "batched":
        # The transport's own rate for the same callers: how much batching and the model
        # cost over it (issue 16).
        pts.append(dict(base, model="identity", size=4096, label="identity-8x8",
                        callers=MLP_PROCS, mode="processes", per_proc=MLP_PER_PROC))
        fair = dict(mlp, callers=1, max_iters=prof.max_iters)
        pts += [dict(fair, label="fair-alone"),
                dict(fair, label="fair-flood", flood=FLOOD),
                dict(fair, label="fair-flood-high", flood=FLOOD, priority=1)]
    return pts


def run_batching(prof: Profile, workdir: Path, errors: list, servers: list,
                 threads: int = 0) -> dict:
    """Dynamic batching on and off, in one run: two daemons (batched, unbatched) up at once,
    measured in interleaved rounds (order alternating), so background load hits both alike.
    Each point also carries the daemon's model stats over its timed phase (mean batch size,
    queue and compute time)."""
    out: dict = {"rows": [], "skipped": {}, "config": {
        "mlp_procs": MLP_PROCS, "mlp_per_proc": MLP_PER_PROC, "image_callers": IMAGE_CALLERS,
        "flood": FLOOD, "effnet_batch": EFFNET_BATCH, "effnet_delay_us": EFFNET_DELAY_US,
        "image": IMAGE.name, "image_bytes": IMAGE.stat().st_size if IMAGE.exists() else 0,
        "threads": threads}}
    why = examples_available()
    if why:
        out["skipped"]["efficientnet"] = why
        log(f"batching: EfficientNet points skipped: {why}")
    out["skipped"]["gpu"] = gpu_skip_reason()
    srvs = {v: batching_server(workdir, v, not why, threads) for v in ("batched", "unbatched")}
    servers += srvs.values()
    started = []
    try:
        for srv in srvs.values():
            srv.start(workdir, timeout=300)
            started.append(srv)
        variants = list(srvs)
        for r in range(1, prof.batch_rounds + 1):
            log(f"batching round {r}/{prof.batch_rounds}")
            order = variants if r % 2 else variants[::-1]
            pts = []
            for v in order:
                pts += batching_points(prof, v, srvs[v].addr, r, not why)
            path = workdir / f"batching-{r}.json"
            path.write_text(json.dumps(pts))
            for row in run_loadgen(["run", "--points", str(path)], point_budget(pts)):
                (errors if "error" in row else out["rows"]).append(row)
    except RuntimeError as e:
        log(str(e))
        errors.append({"phase": "batching", "error": str(e)})
    finally:
        for srv in started:
            srv.stop()
    return out


def gpu_skip_reason() -> str:
    """Why the GPU targets are not measured here ('' if a GPU is visible to torch)."""
    p = subprocess.run([str(PY), "-c", "import torch; print(torch.cuda.is_available())"],
                       capture_output=True, text=True, timeout=120)
    if p.stdout.strip() == "True":
        return ("a GPU is visible, but this run measures the CPU variants only "
                "(the GPU targets need a GPU run of their own)")
    return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"


# -- tensord-gateway ---------------------------------------------------------------------


def group_cpu_ns(pgid: int) -> int:
    """CPU run time (ns, schedstat) of every thread of every process in process group pgid:
    a server and its workers (gunicorn's)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # field 5 of stat(5): pgrp
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        total += int(f.read().split()[0])
    return total


def run_gateway(prof: Profile, workdir: Path, errors: list, servers: list) -> list[dict]:
    """tensord-gateway (HTTP JSON, HTTP binary, gRPC over a Unix socket) in front of a
    blocking tensord daemon, against the Flask+JSON and grpcio baselines and shmclient
    itself, identity at 4 KiB and 1 MiB, one caller, in interleaved rounds with every server
    up. Each point runs in its own loadgen so the servers' CPU per call (schedstat of their
    process groups) can be put beside its latency: where the time goes."""
    if not GATEWAY.exists():
        errors.append({"phase": "gateway", "error": f"{GATEWAY} is missing: run bench/run.sh, "
                       "which builds it"})
        return []
    daemon = tensord_server(workdir, "gw", 0)
    http_addr = f"127.0.0.1:{free_port()}"
    gw_grpc = str(workdir / "gateway-grpc.sock")
    gw = Server("tensord-gateway", [str(GATEWAY), "-socket", daemon.addr, "-http", http_addr,
                                    "-grpc", "unix:" + gw_grpc],
                http_ready(f"http://{http_addr}/v2/health/ready"))
    grpc_sock = str(workdir / "grpc-gw.sock")
    grpc_srv = Server("grpc-gw", [str(PY), str(SERVERS / "grpc_server.py"), "--socket",
                                  grpc_sock, "--threads", "8"], unix_ready(grpc_sock))
    flask_addr = f"127.0.0.1:{free_port()}"
    flask = Server("http-json-gw", [str(ROOT / ".venv" / "bin" / "gunicorn"), "-w", "1", "-k",
                                    "gthread", "--threads", "8", "-b", flask_addr, "--timeout",
                                    "120", "--log-level", "warning", "--chdir", str(SERVERS),
                                    "http_app:app"],
                   http_ready(f"http://{flask_addr}/v2/health/ready"))
    # label, transport, addr, the servers whose CPU a call costs
    labels = [("tensord-copy/block", "tensord-copy", daemon.addr, [daemon]),
              ("gw-http-json", "gw-http-json", http_addr, [gw, daemon]),
              ("gw-http-binary", "gw-http-binary", http_addr, [gw, daemon]),
              ("gw-grpc", "gw-grpc", gw_grpc, [gw, daemon]),
              ("grpc-uds", "grpc", grpc_sock, [grpc_srv]),
              ("http-json", "http-json", flask_addr, [flask])]
    order_srv = [daemon, gw, grpc_srv, flask]
    servers += order_srv
    rows: list[dict] = []
    started = []
    try:
        for srv in order_srv:
            srv.start(workdir)
            started.append(srv)
        for r in range(1, prof.gateway_rounds + 1):
            log(f"gateway round {r}/{prof.gateway_rounds}")
            order = labels if r % 2 else labels[::-1]
            for size in prof.gateway_sizes:
                for label, transport, addr, srvs in order:
                    pt = {"transport": transport, "label": label, "addr": addr, "spin_ns": 0,
                          "model": "identity", "size": size, "callers": 1,
                          "mode": "goroutines", "warmup_ns": int(prof.warmup * 1e9),
                          "duration_ns": int(prof.headline_duration * 1e9), "min_iters": 5,
                          "max_iters": prof.max_iters, "hard_cap_ns": int(prof.hard_cap * 1e9),
                          "phase": "gateway", "round": r}
                    path = workdir / "gateway-point.json"
                    path.write_text(json.dumps([pt]))
                    cpu0 = {s.name: group_cpu_ns(s.proc.pid) for s in srvs}
                    got = run_loadgen(["run", "--points", str(path)], point_budget([pt]))
                    cpu1 = {s.name: group_cpu_ns(s.proc.pid) for s in srvs}
                    for row in got:
                        if "error" in row:
                            errors.append(row)
                            continue
                        calls = row["count"] + row.get("warm_calls", 0)
                        row["server_cpu_us"] = {
                            ("daemon" if s is daemon else "gateway" if s is gw else "server"):
                            (cpu1[s.name] - cpu0[s.name]) / 1e3 / max(1, calls) for s in srvs}
                        rows.append(row)
    except RuntimeError as e:
        log(str(e))
        errors.append({"phase": "gateway", "error": str(e)})
    finally:
        for srv in reversed(started):
            srv.stop()
    return rows


# -- the daemon at rest, the Go client alone, the daemon's hot path alone ------------------


def proc_cpu(pid: int) -> dict:
    """A process's CPU so far: utime + stime from /proc/<pid>/stat (clock ticks), the
    scheduler's own run time summed over its threads (ns, /proc/<pid>/task/*/schedstat), and
    its threads' context switches."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    run_ns = switches = threads = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run_ns += int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        switches += int(line.split()[1])
            threads += 1
    return {"ticks": ticks, "run_ns": run_ns, "switches": switches, "threads": threads,
            "t": time.monotonic()}


def run_idle(prof: Profile, srv: Server, workdir: Path, errors: list) -> dict | None:
    """A blocking daemon (spin_us = 0) with IDLE_SESSIONS connected, idle sessions, opened by
    IDLE_PROCS `loadgen sessions` processes (each session makes one call first): the
    daemon's CPU over prof.idle_seconds, as % of one core."""
    clients: list[subprocess.Popen] = []
    try:
        srv.start(workdir)
        per = [IDLE_SESSIONS // IDLE_PROCS + (i < IDLE_SESSIONS % IDLE_PROCS)
               for i in range(IDLE_PROCS)]
        for n in per:
            clients.append(subprocess.Popen(
                [str(LOADGEN), "sessions", "--addr", srv.addr, "--n", str(n)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, start_new_session=True))
        for c in clients:
            line = c.stdout.readline().strip()
            if not line.startswith("connected"):
                raise RuntimeError(f"idle sessions: a client process said {line!r}")
        time.sleep(1.0)  # the handshakes' and first calls' after-effects settle
        pid = srv.proc.pid
        a = proc_cpu(pid)
        time.sleep(prof.idle_seconds)
        b = proc_cpu(pid)
        wall = b["t"] - a["t"]
        hz = os.sysconf("SC_CLK_TCK")
        out = {"sessions": IDLE_SESSIONS, "client_procs": IDLE_PROCS, "seconds": round(wall, 2),
               "cpu_pct": 100 * (b["ticks"] - a["ticks"]) / hz / wall,
               "cpu_pct_schedstat": 100 * (b["run_ns"] - a["run_ns"]) / 1e9 / wall,
               "context_switches": b["switches"] - a["switches"], "threads": b["threads"],
               "tick_s": 1 / hz}
        log(f"idle daemon, {IDLE_SESSIONS} sessions: {out['cpu_pct']:.2f}% of a core "
            f"(schedstat {out['cpu_pct_schedstat']:.3f}%), {out['context_switches']} context "
            f"switches in {wall:.1f} s, {out['threads']} threads")
        return out
    except (RuntimeError, OSError) as e:
        log(f"idle measurement failed: {e}")
        errors.append({"phase": "idle", "error": str(e)})
        return None
    finally:
        for c in clients:
            with contextlib.suppress(OSError):
                c.stdin.close()
        for c in clients:
            try:
                c.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.pid, signal.SIGKILL)
                c.wait(5)
        srv.stop()


def parse_gobench(text: str) -> list[dict]:
    """`go test -bench` lines -> {name, n, metrics: {unit: value}}."""
    rows = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 4 or not f[0].startswith("Benchmark") or not f[1].isdigit():
            continue
        name = f[0].rsplit("-", 1)[0] if f[0].rsplit("-", 1)[-1].isdigit() else f[0]
        metrics = {}
        for v, unit in zip(f[2::2], f[3::2]):
            with contextlib.suppress(ValueError):
                metrics[unit] = float(v)
        rows.append({"name": name, "n": int(f[1]), "metrics": metrics})
    return rows


def run_gobench(errors: list) -> list[dict]:
    """go/shmclient's benchmarks (`go test -run XXX -bench . -benchmem`): the Go client's
    round trip, CPU and allocations per call, against a daemon its TestMain starts."""
    log("gobench: go test -bench . -benchmem in go/shmclient")
    env = dict(os.environ, TENSORD_PYTHON=str(PY))
    try:
        p = subprocess.run(["go", "test", "-run", "XXX", "-bench", ".", "-benchmem"],
                           cwd=ROOT / "go" / "shmclient", env=env, capture_output=True,
                           text=True, timeout=600)
    except subprocess.TimeoutExpired:
        errors.append({"phase": "gobench", "error": "go test -bench ran past 600 s"})
        return []
    rows = parse_gobench(p.stdout)
    for r in rows:
        m = r["metrics"]
        log(f"  {r['name']:32} {m.get('ns/op', 0):10.0f} ns/op  "
            f"{m.get('allocs/op', float('nan')):4.0f} allocs/op  "
            f"call-cpu {m.get('call-cpu-ns/op', float('nan')):7.0f} ns/op")
    if p.returncode != 0:
        fails = [ln for ln in p.stdout.splitlines() if ln.startswith(("--- FAIL", "FAIL"))]
        errors.append({"phase": "gobench", "error": f"go test exited {p.returncode}: "
                       + "; ".join(fails)[:300] + " " + p.stderr[-300:]})
    return rows


def run_hotpath(prof: Profile, errors: list) -> dict:
    """profile_daemon.py: the daemon's take + execute per request, in-process."""
    log("hotpath: the daemon's per-request work in-process (profile_daemon.py)")
    try:
        p = subprocess.run([str(PY), str(BENCH / "profile_daemon.py"), "--json", "--n",
                            str(prof.hotpath_n)], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        errors.append({"phase": "hotpath", "error": "profile_daemon.py ran past 300 s"})
        return {}
    if p.returncode != 0:
        errors.append({"phase": "hotpath", "error": p.stderr[-400:]})
        return {}
    out: dict = {"cases": [], "steps": []}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            if "hotpath" in d:
                out["cases"].append(d["hotpath"])
                log(f"  {d['hotpath']['case']:24} p50 {d['hotpath']['p50_us']:.2f} µs")
            else:
                out["steps"].append(d["hotpath_step"])
                out["steps_case"] = d["case"]
    return out


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
                   "import torch, grpc, flask, gunicorn, msgpack, sys;"
                   "print(sys.version.split()[0], torch.__version__, grpc.__version__,"
                   " flask.__version__, gunicorn.__version__,"
                   " '.'.join(map(str, msgpack.version)))").split()
    names = ["python", "torch", "grpcio", "flask", "gunicorn", "msgpack"]
    # An exported tree (git archive) is no repository: TENSORD_BENCH_COMMIT names it.
    commit = os.environ.get("TENSORD_BENCH_COMMIT") or cmd("git", "rev-parse", "--short", "HEAD")
    dirty = (not os.environ.get("TENSORD_BENCH_COMMIT")
             and bool(cmd("git", "status", "--porcelain")))
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
        "commit": commit,
        "dirty": dirty,
        **dict(zip(names, versions)),
    }


# -- main ------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a few minutes (the default)")
    g.add_argument("--full", action="store_true", help="more sizes, longer points")
    ap.add_argument("--only", default="", help="comma-separated phases (floors, headline, "
                    "sweep, idle, gobench, hotpath, batching, gateway) and/or servers "
                    "(tensord, tensord-spin, msgpack, grpc, http)")
    ap.add_argument("--spin-us", type=int, default=None,
                    help="spin budget of the spin-then-block runs "
                    "(daemon spin_us and Go WithSpin)")
    ap.add_argument("--batch-threads", type=int, default=0, metavar="N",
                    help="daemon `threads` of the batching phase's daemons (0: the daemon's "
                    "default, the cores it may use)")
    ap.add_argument("--out", default=str(BENCH / "results"), help="results directory")
    ap.add_argument("--readme", action="store_true",
                    help="also put this run's tables and plots into bench/README.md")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                    help="first wait up to this long for the machine to be idle (<10%% busy)")
    args = ap.parse_args()
    prof = FULL if args.full else QUICK
    spin_us = args.spin_us if args.spin_us is not None else prof.spin_us
    only = {s for s in args.only.split(",") if s}
    phases = {"floors", "headline", "sweep", "idle", "gobench", "hotpath", "batching",
              "gateway"}
    kinds = {"tensord", "tensord-spin", "msgpack", "grpc", "http"}
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
    idle: dict | None = None
    gobench: list[dict] = []
    hotpath: dict = {}
    batching: dict = {}
    gateway: list[dict] = []
    try:
        if want("hotpath"):
            hotpath = run_hotpath(prof, errors)
        if want("floors"):
            log("floors: eventfd ping-pong, busy-poll ping-pong, memcpy")
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
        if want("idle") and want("tensord"):
            idle_srv = tensord_server(workdir, "idle", 0)
            servers.append(idle_srv)
            idle = run_idle(prof, idle_srv, workdir, errors)
        if want("batching"):
            batching = run_batching(prof, workdir, errors, servers, args.batch_threads)
        if want("gateway"):
            gateway = run_gateway(prof, workdir, errors, servers)
        if want("gobench"):
            gobench = run_gobench(errors)
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
           "headline_floors": headline_floors, "points": results, "idle": idle,
           "gobench": gobench, "hotpath": hotpath, "batching": batching, "gateway": gateway,
           "errors": errors}
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
