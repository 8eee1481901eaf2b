"""Operator commands and probes (issue 17.8): `tensord health`, `status`, `stats`, `models` and
`ping` took 5-6 s and 850 MB each (they imported torch) and each opened a session with
2 x 16 MiB of shared memory and two INFO lines. They now open a control-only connection
(SPEC hello `control_only`) from a client that imports no torch."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import start_daemon

from tensord.client import Client
from tensord.config import load_config
from tensord.contract.codec import packb, unpackb
from tensord.contract.errors import ResourceError
from tensord.contract.frames import encode_frame, read_frame, send_frame_with_fds
from tensord.contract.layout import segment_size, write_header
from tensord.contract.messages import Goodbye, Ping, Pong, Ready, Welcome
from tensord.probe import ControlClient

COMMANDS = ("health", "status", "stats", "models", "ping")
HEAVY = ("torch", "numpy")


# `tensord CMD`, then its peak RSS from the process itself: VmHWM is the high-water mark of
# this process's own memory map (ru_maxrss would include the forked test runner's).
MEASURED = """
import sys
from tensord.cli import main
rc = main(sys.argv[1:])
with open("/proc/self/status") as f:
    peak = next(ln.split()[1] for ln in f if ln.startswith("VmHWM:"))
print("VmHWM", peak, file=sys.stderr)
sys.exit(rc)
"""


def run_measured(args: list[str]) -> tuple[int, str, float, int]:
    """Run `tensord ARGS`; (exit status, stdout, seconds, peak RSS in bytes)."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", MEASURED, *args], capture_output=True,
                       text=True, timeout=120)
    took = time.monotonic() - t0
    peak = next(int(ln.split()[1]) for ln in r.stderr.splitlines() if ln.startswith("VmHWM"))
    return r.returncode, r.stdout, took, peak * 1024


def test_operator_commands_import_no_torch_and_open_no_session(tmp_path):
    """With the daemon's only session taken, every command still answers (a session would
    be refused), imports neither torch nor numpy, and the daemon logs nothing for it."""
    d = start_daemon(tmp_path, config="[daemon]\nmax_sessions = 1\n")
    try:
        with Client(d.path) as only:
            with pytest.raises(ResourceError, match="max_sessions=1"):
                Client(d.path)  # what a probe that opened a session would have met
            only.ping()
            before = d.logs()
            fds = len(d.open_fds())
            for cmd in COMMANDS:
                argv = [sys.executable, "-X", "importtime", "-m", "tensord", cmd,
                        "--socket", d.path]
                r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
                assert r.returncode == 0, (cmd, r.stdout, r.stderr)
                imported = {ln.rsplit("|", 1)[-1].strip().split(".")[0]
                            for ln in r.stderr.splitlines() if ln.startswith("import time:")}
                assert imported and not imported & set(HEAVY), (cmd, imported & set(HEAVY))
                rc, out, took, rss = run_measured([cmd, "--socket", d.path])
                assert rc == 0, (cmd, out)
                print(f"tensord {cmd}: {took * 1e3:.0f} ms, {rss / 2**20:.1f} MiB peak RSS")
                assert rss < 50 << 20, f"tensord {cmd} peaked at {rss / 2**20:.1f} MiB"
            assert "ready" in subprocess.run(
                [sys.executable, "-m", "tensord", "health", "--socket", d.path],
                capture_output=True, text=True, timeout=120).stdout
            assert len(d.open_fds()) == fds, "a probe left descriptors behind"
            assert d.logs() == before, "probes logged:\n" + d.logs()[len(before):]
    finally:
        assert d.stop() == 0, d.logs()


def test_an_idle_control_connection_does_not_hold_the_drain_up(tmp_path):
    d = start_daemon(tmp_path, config="[daemon]\ndrain_grace_s = 30\n")
    try:
        c = ControlClient(d.path, name="monitor")
        assert c.health().ready and not c.session
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=20) == 0, d.logs()
        # told goodbye at once rather than kept for the 30 s grace
        assert time.monotonic() - t0 < 15
        with pytest.raises(Exception, match="goodbye|closed"):
            c.ping()
        c.close()
    finally:
        d.proc.kill()
        d.proc.wait()


def _fd_links() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the directory's own descriptor, gone already
    return out


def test_control_only_client_with_a_daemon_that_ignores_the_key(tmp_path):
    """A v4 daemon from before `control_only` (played here by a scripted one: a protocol
    edge case) makes a session anyway: the client closes its descriptors unmapped, asked
    for the smallest rings, and works."""
    path = str(tmp_path / "old.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    seen: dict = {}

    def old_daemon() -> None:
        conn, _ = listener.accept()
        with conn:
            n = int.from_bytes(conn.recv(4, socket.MSG_WAITALL), "little")
            seen["hello"] = unpackb(conn.recv(n, socket.MSG_WAITALL))
            ring = seen["hello"]["request_ring"]
            size = segment_size(ring, ring)
            mfd = os.memfd_create("old-daemon")
            os.ftruncate(mfd, size)
            with open(f"/proc/self/fd/{mfd}", "r+b", buffering=0) as f:
                hdr = bytearray(4096)
                write_header(memoryview(hdr), ring, ring)
                f.write(hdr)
            efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
            send_frame_with_fds(conn, Welcome(4, "0" * 32, size, ring, ring, 1 << 20,
                                              "tensord 0.0.9"), [mfd, *efds])
            for fd in (mfd, *efds):
                os.close(fd)
            assert read_frame(conn).TYPE == "attached"
            conn.sendall(encode_frame(Ready()))
            ping = read_frame(conn)
            assert isinstance(ping, Ping)
            conn.sendall(encode_frame(Pong(id=ping.id)))
            seen["last"] = read_frame(conn)

    t = threading.Thread(target=old_daemon)
    t.start()
    def session_fds() -> int:
        return sum("old-daemon" in x or "eventfd" in x for x in _fd_links())

    before = session_fds()  # other tests' clients may hold eventfds in this process
    try:
        with ControlClient(path) as c:
            assert c.session, "the old daemon made a session"
            # the scripted daemon closed its copies before `ready`: any more would be ours
            assert session_fds() == before
            c.ping()
        t.join(timeout=30)
    finally:
        listener.close()
    assert seen["hello"]["control_only"] is True
    assert seen["hello"]["request_ring"] == seen["hello"]["response_ring"] == 65536
    assert isinstance(seen["last"], Goodbye)
    assert packb(True) == b"\xc3"  # the key as the vectors hold it (hello_control_only)


# -- systemd (issue 17.10): the unit starts with every option its sample config shows --------

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"


def unit_directives(path: Path) -> dict[str, list[str]]:
    """Key -> values (in order) of a unit file's [Service] section."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out.setdefault(k, []).append(v)
    return out


def sample_config_variants() -> list[str]:
    """systemd/tensord.toml as shipped, and once more with each option it shows commented
    out in [daemon] switched on (one at a time: the two metrics lines are alternatives)."""
    text = (SYSTEMD / "tensord.toml").read_text()
    lines = text.splitlines()
    out = [text]
    section = ""
    for i, line in enumerate(lines):
        if re.match(r"#? ?\[", line):  # a table, or the commented-out [[models]] example
            section = line
        m = re.match(r"# ([a-z_]+) = ", line)
        if section == "[daemon]" and m:
            out.append("\n".join(lines[:i] + [line[2:]] + lines[i + 1:]))
    return out


def test_the_unit_allows_every_option_its_sample_config_shows(tmp_path):
    """Per directive: the address families the config can ask for, where it makes the daemon
    write (ProtectSystem=strict leaves the RuntimeDirectory), how long a stop may take.
    (No systemd runs as PID 1 here, so the unit itself is checked by systemd-analyze verify
    in test_systemd.py and the daemon is started with each variant below.)"""
    from tensord.control.server import STOP_MARGIN_S
    from tensord.metrics import parse_tcp

    unit = unit_directives(SYSTEMD / "tensord.service")
    families = set(unit["RestrictAddressFamilies"][-1].split())
    runtime = "/run/" + unit["RuntimeDirectory"][-1] + "/"
    start = unit["ExecStart"][-1].split()
    sock = start[start.index("--socket") + 1]
    stop_s = float(unit["TimeoutStopSec"][-1])
    variants = sample_config_variants()
    assert len(variants) >= 4, "the shipped config, two metrics addresses, allow_handlers"
    metrics_seen = set()
    for i, text in enumerate(variants):
        f = tmp_path / f"variant{i}.toml"
        f.write_text(text)
        cfg = load_config(str(f))
        need = {"AF_UNIX"}
        writes = [sock]
        if cfg.metrics.startswith("unix:"):
            writes.append(cfg.metrics[len("unix:"):])
            metrics_seen.add("unix")
        elif cfg.metrics:
            host, _ = parse_tcp(cfg.metrics)
            need.add("AF_INET6" if ":" in host else "AF_INET")
            metrics_seen.add("tcp")
        assert need <= families, f"variant {i} needs {need - families}:\n{text}"
        assert all(p.startswith(runtime) for p in writes), (writes, runtime)
        assert stop_s >= cfg.drain_grace_s + STOP_MARGIN_S
    assert metrics_seen == {"unix", "tcp"}
    # systemctl reload: the zero-downtime upgrade of the daemon ExecStart= runs, on its socket
    reload = unit["ExecReload"][-1].split()
    assert reload[0] == start[0] and reload[1] == "upgrade"
    assert reload[reload.index("--socket") + 1] == sock
    assert reload[reload.index("--pid") + 1] == "$MAINPID"


@pytest.mark.parametrize("metrics", ["tcp", "unix"])
def test_the_daemon_starts_and_reloads_with_the_sample_config(tmp_path, metrics):
    """The sample config with its metrics line switched on, paths moved into the test's
    directory (and port 0), started; SIGHUP (`systemctl kill --signal=HUP`) reloads it in
    place; `systemctl reload`'s command (ExecReload=, the zero-downtime upgrade) run as the
    unit writes it: a new daemon, with the same config and its metrics listener, serves on."""
    text = (SYSTEMD / "tensord.toml").read_text()
    msock = tmp_path / "metrics.sock"
    text = text.replace('# metrics = "127.0.0.1:9464"', 'metrics = "127.0.0.1:0"' if
                        metrics == "tcp" else f'metrics = "unix:{msock}"')
    text = text.replace('model_dirs = ["/var/lib/tensord/models"]',
                        f'model_dirs = ["{tmp_path}"]')
    text = text.replace("admin_uids = [0]", f"admin_uids = [{os.getuid()}]")
    d = start_daemon(tmp_path, config=text)
    new = 0
    try:
        where = "metrics on http://127.0.0.1:" if metrics == "tcp" else f"metrics on unix:{msock}"
        assert where in d.logs()
        os.kill(d.pid, signal.SIGHUP)
        end = time.monotonic() + 60
        while "SIGHUP: reloaded" not in d.logs():
            assert time.monotonic() < end, d.logs()
            time.sleep(0.05)
        reload = unit_directives(SYSTEMD / "tensord.service")["ExecReload"][-1]
        reload = reload.replace("/opt/tensord/bin/tensord",
                                str(Path(sys.executable).with_name("tensord")))
        reload = reload.replace("/run/tensord/tensord.sock", d.path)
        r = subprocess.run(reload.replace("$MAINPID", str(d.pid)).split(), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr + d.logs()
        new = int(re.search(r"new daemon \(pid (\d+)\)", r.stdout).group(1))
        assert d.proc.wait(timeout=60) == 0, d.logs()
        assert d.logs().count(where) == 2, d.logs()  # the new daemon's metrics listener
        with ControlClient(d.path) as c:
            assert c.health().ready
    finally:
        d.stop()
        if new:
            os.kill(new, signal.SIGTERM)
            end = time.monotonic() + 30
            while os.path.exists(f"/proc/{new}") and time.monotonic() < end:
                time.sleep(0.05)


# -- the three views agree (issue 17.9) ----------------------------------------------------------

def scrape(path: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    with s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    body = data.decode().partition("\r\n\r\n")[2]
    return {(x.name, frozenset(x.labels.items())): x.value
            for fam in text_string_to_metric_families(body) for x in fam.samples}


def test_stats_prometheus_and_the_log_agree_on_bad_input_and_failed(tmp_path):
    """Bad client input is `bad input` in `tensord stats`, BAD_INPUT in Prometheus and in the
    log (rate-limited), never `failed`; queue-depth and readiness gauges are scraped."""
    import torch

    msock = tmp_path / "metrics.sock"
    d = start_daemon(tmp_path, config=f'[daemon]\nmetrics = "unix:{msock}"\n')
    try:
        with Client(d.path) as c:
            for i in range(2):
                c.infer("mlp", {"x": torch.full((1, 16), float(i))})
            for _ in range(30):  # the wrong width: the caller's error
                with pytest.raises(Exception, match="BAD_INPUT|input 'x'"):
                    c.infer("mlp", {"x": torch.ones(2, 15)})
        with ControlClient(d.path) as c:
            mlp = next(m for m in c.stats() if m.name == "mlp")
        assert (mlp.served, mlp.failed, mlp.bad_input) == (2, 0, 30), mlp
        r = subprocess.run([sys.executable, "-m", "tensord", "stats", "--socket", d.path],
                           capture_output=True, text=True, timeout=60)
        head, row = (ln.split() for ln in r.stdout.splitlines()[:3:2]
                     if ln.startswith(("model", "mlp")))
        cols = dict(zip(" ".join(head).replace("bad input", "bad_input").split(), row))
        assert (cols["served"], cols["failed"], cols["bad_input"]) == ("2", "0", "30"), r.stdout
        m = scrape(str(msock))
        assert m[("tensord_requests_total", frozenset({("model", "mlp"),
                                                       ("outcome", "BAD_INPUT")}))] == 30
        assert m[("tensord_requests_total", frozenset({("model", "mlp"),
                                                       ("outcome", "ok")}))] == 2
        assert not any(k[0] == "tensord_requests_total" and ("outcome", "MODEL_FAILED") in k[1]
                       for k in m)
        assert m[("tensord_model_queue_depth", frozenset({("model", "mlp")}))] == 0
        assert m[("tensord_model_ready", frozenset({("model", "mlp")}))] == 1
        assert m[("tensord_ready", frozenset())] == 1
        assert m[("tensord_draining", frozenset())] == 0
    finally:
        assert d.stop() == 0, d.logs()


def test_refused_requests_are_logged_rate_limited(tmp_path):
    import torch

    d = start_daemon(tmp_path)
    try:
        with Client(d.path) as c:
            for _ in range(30):
                with pytest.raises(Exception, match="BAD_INPUT|input 'x'"):
                    c.infer("mlp", {"x": torch.ones(2, 15)})
        answered = [ln for ln in d.logs().splitlines() if "BAD_INPUT" in ln]
        assert 1 <= len(answered) <= 10, answered  # logged, and rate-limited
    finally:
        assert d.stop() == 0, d.logs()
