"""Fixtures that start real daemons and build real Go binaries."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Daemon:
    proc: subprocess.Popen
    path: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def shm_entries(self) -> list[str]:
        return shm_entries(self.pid)

    def open_fds(self) -> list[str]:
        """The daemon's open descriptors (sessions hold a memfd and four eventfds each)."""
        return os.listdir(f"/proc/{self.pid}/fd")

    def stop(self) -> int:
        return stop_process(self.proc, signal.SIGTERM, timeout=20)

    def logs(self) -> str:
        return self.log.read_text()


def stop_process(proc: subprocess.Popen, sig: int, timeout: float) -> int:
    """Send sig, wait up to `timeout` s, then SIGKILL; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_until(cond, what: str, timeout: float = 60.0) -> None:
    """Wait for observable state; the timeout only keeps a broken daemon from hanging CI."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


def shm_entries(pid: int | None = None) -> list[str]:
    """Anything in /dev/shm named like tensord's; protocol 3 creates nothing there at all."""
    return [e for e in os.listdir("/dev/shm") if "tensord" in e]


def start_daemon(tmp: Path, *args: str, config: str | None = None,
                 preexec_fn=None) -> Daemon:
    path = str(tmp / "tensord.sock")
    log = tmp / "daemon.log"
    cmd = [sys.executable, "-m", "tensord", "serve", "--socket", path, *args]
    if config:
        cfg = tmp / "tensord.toml"
        cfg.write_text(config)
        cmd += ["--config", str(cfg)]
    f = open(log, "w")
    # The tests' own handlers (handlers_for_tests) are importable by every test daemon.
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
                            env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            return Daemon(proc, path, log)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"daemon did not start listening:\n{log.read_text()}")


@pytest.fixture(autouse=True)
def _undo_test_users():
    """Users and group memberships a test made (users.ensure_user) go when it ends, pass or
    fail: the machine is left as it was found."""
    yield
    import users

    users.remove_made()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("daemon"))
    yield d
    rc = d.stop()
    assert rc == 0, d.logs()
    assert d.shm_entries() == []


@pytest.fixture
def fresh_daemon(tmp_path):
    """A daemon of the test's own, for tests that kill or break it."""
    d = start_daemon(tmp_path)
    yield d
    d.stop()


@pytest.fixture(scope="session")
def go_probe(tmp_path_factory) -> str:
    """The Go CLI under go/cmd/shmprobe, built for this run."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("the Go toolchain is needed: the end-to-end tests run real Go binaries")
    out = tmp_path_factory.mktemp("bin") / "shmprobe"
    subprocess.run([go, "build", "-o", str(out), "./cmd/shmprobe"], cwd=ROOT / "go", check=True)
    return str(out)
