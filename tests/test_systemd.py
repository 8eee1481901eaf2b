"""The systemd units verify, the config and sysusers/tmpfiles files are valid, and the daemon
speaks the manager's protocols: these tests play systemd's side against the real daemon
(readiness, STATUS=, the watchdog, socket activation, and `systemctl reload`'s upgrade, in
which a new daemon becomes the main process and takes the watchdog over)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import struct
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
from tensord.control.takeover import children

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
    # `systemctl reload` is the zero-downtime upgrade, whose new daemon says MAINPID= (test
    # below); the SIGHUP config reload stays a `systemctl kill` away.
    assert "NotifyAccess=all" in unit and "NotifyAccess=main" not in unit
    assert re.search(r"^ExecReload=\S+/tensord upgrade .*--pid \$MAINPID", unit, re.M)
    assert "systemctl kill --signal=HUP --kill-who=main tensord" in unit
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
    """systemd's side of sd_notify: a datagram socket collecting what the daemon says, and
    which process said each line (SO_PASSCRED: the kernel's word, as the manager has it)."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.path = str(path)
        self.said: list[str] = []
        self.by: list[int] = []  # the pid that said each line of `said`

    def receive(self, timeout: float | None) -> None:
        """One notification (TimeoutError when none comes within timeout; 0: none waiting)."""
        self.sock.settimeout(timeout)
        try:
            msg, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(CREDS.size))
        except BlockingIOError as e:
            raise TimeoutError from e
        (pid,) = [CREDS.unpack(data[:CREDS.size])[0] for level, kind, data in anc
                  if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)]
        lines = msg.decode().split("\n")
        self.said.extend(lines)
        self.by.extend([pid] * len(lines))

    def wait_for(self, pred, what: str, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while not pred(self.said):
            left = end - time.monotonic()
            assert left > 0, f"the daemon never said {what}; it said {self.said}"
            with contextlib.suppress(TimeoutError):
                self.receive(left)

    def from_(self, pid: int) -> list[str]:
        """What pid said."""
        return [line for line, p in zip(self.said, self.by, strict=True) if p == pid]

    def clear(self) -> None:
        self.said.clear()
        self.by.clear()

    def close(self) -> None:
        self.sock.close()


CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid


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
        m.clear()
        with pytest.raises(TimeoutError):
            while True:
                m.receive(1.0)
                assert "WATCHDOG=1" not in m.said
        d.proc.send_signal(18)  # SIGCONT
    finally:
        assert d.stop() == 0, d.logs()
        m.close()


ACTIVATED = 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'


def daemon_env() -> dict[str, str]:
    """The environment of the tests' daemons (conftest.start_daemon's): the tests' handlers
    importable."""
    here = str(Path(__file__).resolve().parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH", "")) if p)}


def activate(tmp_path: Path, listener: socket.socket) -> Daemon:
    """Start the daemon as systemd does for tensord.socket: the listening socket as
    descriptor 3, LISTEN_FDS=1 and LISTEN_PID set to the daemon's own pid."""
    log = tmp_path / "daemon.log"
    f = open(log, "a")
    fd = listener.fileno()

    def as_fd3():
        os.dup2(fd, 3)
        os.set_inheritable(3, True)

    proc = subprocess.Popen(["sh", "-c", ACTIVATED, "sh", sys.executable, "-m", "tensord",
                             "serve", "--socket", "/nonexistent/ignored.sock"],
                            stdout=f, stderr=subprocess.STDOUT, env=daemon_env(), preexec_fn=as_fd3,
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


# -- `systemctl reload`: the zero-downtime upgrade under the manager ---------------------------


def unit_command(directive: str, **replace: str) -> list[str]:
    """A command line of tensord.service as systemd would run it here: the venv's tensord,
    and the paths and $VARIABLES given."""
    (line,) = [ln for ln in (SYSTEMD / "tensord.service").read_text().splitlines()
               if ln.startswith(directive + "=")]
    line = line.removeprefix(directive + "=")
    line = line.replace("/opt/tensord/bin/tensord", str(Path(sys.executable).with_name("tensord")))
    for old, new in replace.items():
        line = line.replace(old, new)
    return shlex.split(line)


def serve_as_main(tmp_path: Path) -> Daemon:
    """Start the daemon as systemd starts a service's main process: WATCHDOG_PID is its pid."""
    path = str(tmp_path / "tensord.sock")
    log = tmp_path / "daemon.log"
    with open(log, "a") as f:
        proc = subprocess.Popen(["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", sys.executable,
                                 "-m", "tensord", "serve", "--socket", path],
                                stdout=f, stderr=subprocess.STDOUT, env=daemon_env())
    return Daemon(proc, path, log)


def test_reload_hands_the_service_and_its_watchdog_to_the_new_daemon(tmp_path, monkeypatch):
    """The unit's ExecReload= (`tensord upgrade --pid $MAINPID`) run against a daemon started
    as systemd starts a main process, with this test as the manager. The new daemon inherits
    WATCHDOG_PID naming the old one. It must say MAINPID= before the reload command returns
    (else systemd sees the reload end, or the old main process exit, without a main process
    it knows of) and then ping the watchdog itself (else systemd kills it after WatchdogSec=).
    The old daemon, draining, says nothing more: under NotifyAccess=all its STOPPING=1 would
    stop the service, the new daemon with it."""
    m = Manager(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", m.path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    d = serve_as_main(tmp_path)
    new = 0
    try:
        m.wait_for(lambda s: "READY=1" in s, "READY=1")
        m.wait_for(lambda _: m.from_(d.pid).count("WATCHDOG=1") >= 2, "WATCHDOG=1")
        reload = subprocess.Popen(
            unit_command("ExecReload", **{"/run/tensord/tensord.sock": d.path,
                                          "$MAINPID": str(d.pid)}),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=daemon_env())

        def mark_the_end() -> None:  # in the manager's stream, as the reload ends
            reload.wait()
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(b"X_RELOAD_ENDED=1", m.path)

        marker = threading.Thread(target=mark_the_end)
        marker.start()
        # Read meanwhile, as the manager does: a full queue would block the daemons' sends.
        m.wait_for(lambda s: "X_RELOAD_ENDED=1" in s, "the end of the reload", timeout=300)
        marker.join()
        out, err = reload.communicate()
        assert reload.returncode == 0, out + err + d.logs()
        ended = m.said.index("X_RELOAD_ENDED=1")
        mainpid = [(line, pid) for line, pid in zip(m.said[:ended], m.by, strict=False)
                   if line.startswith("MAINPID=")]
        assert mainpid, f"the reload ended before the manager was told MAINPID=: {m.said}"
        ((line, new),) = mainpid
        assert line == f"MAINPID={new}" and new != d.pid and f"pid {new}" in out, out
        handover = m.said.index(line)
        assert d.proc.wait(timeout=60) == 0, d.logs()  # drained and gone

        assert "STOPPING=1" not in m.from_(d.pid), m.from_(d.pid)
        assert d.pid not in m.by[handover:], \
            f"the old daemon went on notifying: {m.from_(d.pid)[-5:]}"
        m.wait_for(lambda _: m.from_(new).count("WATCHDOG=1") >= 3, "WATCHDOG=1 from the new "
                   "daemon", timeout=30)
        early = [ln for ln, pid in zip(m.said[:handover], m.by, strict=False) if pid == new]
        assert "WATCHDOG=1" not in early and "READY=1" not in early, early
        assert "READY=1" in m.from_(new)
        with Client(d.path) as c:  # the new daemon serves the socket
            assert torch.equal(c.infer("identity", {"x": torch.arange(3)})["y"], torch.arange(3))
        n = m.from_(new).count("WATCHDOG=1")
        m.wait_for(lambda _: m.from_(new).count("WATCHDOG=1") > n, "more pings")
    finally:
        successors = children(d.pid)
        d.stop()
        for pid in {new, *successors} - {0}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    m.wait_for(lambda _: "STOPPING=1" in m.from_(new), "STOPPING=1 from the new daemon")
    m.close()


def test_systemctl_reload_under_a_real_systemd(tmp_path):
    """Where a systemd user manager runs: a transient service with the unit's ExecStart=,
    ExecReload=, Type= and NotifyAccess= (WatchdogSec= shortened), `systemctl --user reload`,
    then the service is still active well past WatchdogSec=, with the new daemon as its main
    process, serving the socket."""
    def systemctl(*args: str, check: bool = True) -> str:
        return subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True,
                              check=check, timeout=300).stdout.strip()

    if shutil.which("systemd-run") is None or shutil.which("systemctl") is None or \
            subprocess.run(["systemctl", "--user", "show-environment"],
                           capture_output=True).returncode != 0:
        pytest.skip("no systemd user manager here (systemd-run --user needs one; this "
                    "machine was not booted with systemd): test_reload_hands_the_service_and_"
                    "its_watchdog_to_the_new_daemon plays the manager's side instead")
    sock = str(tmp_path / "tensord.sock")
    start = unit_command("ExecStart", **{"--config /etc/tensord/tensord.toml ": "",
                                         "/run/tensord/tensord.sock": sock})
    reload = unit_command("ExecReload", **{"/run/tensord/tensord.sock": sock})
    unit = f"tensord-test-{os.getpid()}.service"
    props = ["Type=notify", "NotifyAccess=all", "WatchdogSec=3s", "TimeoutStartSec=300",
             "ExecReload=" + " ".join(reload),  # $MAINPID is systemd's to expand
             "Environment=PYTHONPATH=" + daemon_env()["PYTHONPATH"]]
    try:
        subprocess.run(["systemd-run", "--user", f"--unit={unit}",
                        *[a for p in props for a in ("-p", p)], "--", *start],
                       check=True, capture_output=True, timeout=300)
        old = int(systemctl("show", "-p", "MainPID", "--value", unit))
        systemctl("reload", unit)
        new = int(systemctl("show", "-p", "MainPID", "--value", unit))
        assert new not in (0, old)
        time.sleep(3 * 3)  # three WatchdogSec=: a new daemon that does not ping is killed
        assert systemctl("is-active", unit, check=False) == "active"
        assert int(systemctl("show", "-p", "MainPID", "--value", unit)) == new
        assert not os.path.exists(f"/proc/{old}"), "the old daemon did not drain and exit"
        with Client(sock) as c:
            assert torch.equal(c.infer("identity", {"x": torch.arange(3)})["y"], torch.arange(3))
    finally:
        systemctl("stop", unit, check=False)
        systemctl("reset-failed", unit, check=False)
