"""The systemd units verify, the config and sysusers/tmpfiles files are valid, and the daemon
speaks the manager's protocols: these tests play systemd's side against the real daemon
(readiness, STATUS=, the watchdog, socket activation)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import Daemon, start_daemon
from users import CAP_CHOWN, has_capability

from tensord.client import Client
from tensord.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"


def test_units_verify(tmp_path):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    tensord = Path(sys.executable).with_name("tensord")
    unit = (SYSTEMD / "tensord.service").read_text()
    unit = unit.replace("/opt/tensord/bin/tensord", str(tensord))
    (tmp_path / "tensord.service").write_text(unit)
    shutil.copy(SYSTEMD / "tensord.socket", tmp_path)
    r = subprocess.run([exe, "verify", str(tmp_path / "tensord.service"),
                        str(tmp_path / "tensord.socket")], capture_output=True, text=True)
    # verify exits 0 on warnings too: any output at all is a finding
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 0 and lines == [], "\n".join(lines)
    assert "WatchdogSec=" in unit and "Type=notify" in unit
    sock = (SYSTEMD / "tensord.socket").read_text()
    assert "ListenStream=/run/tensord/tensord.sock" in sock and "SocketMode=0660" in sock
    assert "SocketGroup=tensord" in sock


def test_shipped_config_loads():
    cfg = load_config(str(SYSTEMD / "tensord.toml"))
    assert cfg.socket_mode == 0o660 and cfg.builtin_models
    assert cfg.max_pending > 0 and cfg.model_dirs == ["/var/lib/tensord/models"]


def test_sysusers_and_tmpfiles_make_the_user_and_the_socket_directory(tmp_path):
    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    if sysusers is None or tmpfiles is None:
        pytest.skip("systemd-sysusers / systemd-tmpfiles are not installed on this machine")
    if not has_capability(CAP_CHOWN):
        pytest.skip("systemd-tmpfiles --root chowns: needs CAP_CHOWN (CI runs as root)")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for f in ("passwd", "group", "shadow", "gshadow"):
        (root / "etc" / f).write_text("")
    r = subprocess.run([sysusers, f"--root={root}", str(SYSTEMD / "sysusers.d/tensord.conf")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    passwd = (root / "etc/passwd").read_text()
    assert passwd.startswith("tensord:") and ":/var/lib/tensord:" in passwd, passwd
    assert (root / "etc/group").read_text().startswith("tensord:")
    uid = int(passwd.split(":")[2])
    r = subprocess.run([tmpfiles, f"--root={root}", "--create",
                        str(SYSTEMD / "tmpfiles.d/tensord.conf")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    st = (root / "run/tensord").stat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750 and st.st_uid == uid
    assert (root / "var/lib/tensord/models").is_dir()


class Manager:
    """systemd's side of sd_notify: a datagram socket collecting what the daemon says."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = str(path)
        self.said: list[str] = []

    def wait_for(self, pred, what: str, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while not pred(self.said):
            left = end - time.monotonic()
            assert left > 0, f"the daemon never said {what}; it said {self.said}"
            self.sock.settimeout(left)
            self.said.extend(self.sock.recv(4096).decode().split("\n"))

    def close(self) -> None:
        self.sock.close()


def test_ready_status_and_stopping(tmp_path, monkeypatch):
    m = Manager(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", m.path)
    d = start_daemon(tmp_path)
    try:
        m.wait_for(lambda s: "READY=1" in s, "READY=1")
        m.wait_for(lambda s: any(x.startswith("STATUS=serving") for x in s), "its status")
        with Client(d.path):
            m.wait_for(lambda s: any("1 sessions" in x for x in s), "that it has a session")
    finally:
        assert d.stop() == 0, d.logs()
    m.wait_for(lambda s: "STOPPING=1" in s, "STOPPING=1")
    said = m.said
    assert said.index("READY=1") < said.index("STOPPING=1")
    assert not any(x == "WATCHDOG=1" for x in said), "no watchdog was asked for"
    m.close()


def test_watchdog_pings_come_from_the_running_loop(tmp_path, monkeypatch):
    m = Manager(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", m.path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    d = start_daemon(tmp_path)
    try:
        m.wait_for(lambda s: s.count("WATCHDOG=1") >= 3, "WATCHDOG=1 three times")
        with Client(d.path) as c:  # pings and serving go on together
            assert torch.equal(c.infer("identity", {"x": torch.ones(3)})["y"], torch.ones(3))
            n = m.said.count("WATCHDOG=1")
            m.wait_for(lambda s: s.count("WATCHDOG=1") > n, "more pings")
        # The pings stop with the daemon: a hung daemon would be restarted by systemd.
        d.proc.send_signal(19)  # SIGSTOP: it cannot ping now
        m.said.clear()
        m.sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            while True:
                m.said.extend(m.sock.recv(4096).decode().split("\n"))
                assert "WATCHDOG=1" not in m.said
        d.proc.send_signal(18)  # SIGCONT
    finally:
        assert d.stop() == 0, d.logs()
        m.close()


ACTIVATED = 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'


def activate(tmp_path: Path, listener: socket.socket) -> Daemon:
    """Start the daemon as systemd does for tensord.socket: the listening socket as
    descriptor 3, LISTEN_FDS=1 and LISTEN_PID set to the daemon's own pid."""
    log = tmp_path / "daemon.log"
    f = open(log, "a")
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": here}
    fd = listener.fileno()

    def as_fd3():
        os.dup2(fd, 3)
        os.set_inheritable(3, True)

    proc = subprocess.Popen(["sh", "-c", ACTIVATED, "sh", sys.executable, "-m", "tensord",
                             "serve", "--socket", "/nonexistent/ignored.sock"],
                            stdout=f, stderr=subprocess.STDOUT, env=env, preexec_fn=as_fd3,
                            close_fds=False)  # close_fds would close 3 after preexec_fn
    f.close()
    return Daemon(proc, listener.getsockname(), log)


def test_socket_activation(tmp_path, monkeypatch):
    path = str(tmp_path / "tensord.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o660)
    listener.listen(128)
    m = Manager(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", m.path)
    got: dict = {}

    def early_client():
        # connects before the daemon runs at all: waits in the manager's socket queue
        with Client(path, timeout=300) as c:
            got["y"] = c.infer("identity", {"x": torch.arange(4)})["y"]

    t = threading.Thread(target=early_client)
    t.start()
    try:
        for _ in range(2):  # the socket outlives a daemon: the next one takes it over
            d = activate(tmp_path, listener)
            try:
                m.wait_for(lambda s: "READY=1" in s, "READY=1")
                t.join()
                assert torch.equal(got["y"], torch.arange(4))
                with Client(path) as c:
                    c.ping()
                assert f"listening on {path} (socket activation)" in d.logs()
            finally:
                assert d.stop() == 0, d.logs()
            m.said.clear()
            # the manager's socket file stays (the daemon did not make it)
            assert stat.S_ISSOCK(os.stat(path).st_mode)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    finally:
        t.join()
        listener.close()
        m.close()


def test_socket_activation_with_a_wrong_socket_fails_with_a_reason(tmp_path):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    d = activate(tmp_path, udp)
    assert d.proc.wait(timeout=300) == 1
    assert "not a listening Unix stream socket" in d.logs()
    assert "Traceback" not in d.logs()
    udp.close()
