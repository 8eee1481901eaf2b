"""The systemd unit verifies, its config loads, and the daemon tells systemd it is ready."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import start_daemon

from tensord.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def test_unit_file_verifies(tmp_path):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    tensord = Path(sys.executable).with_name("tensord")
    unit = (ROOT / "systemd" / "tensord.service").read_text()
    unit = unit.replace("/opt/tensord/bin/tensord", str(tensord))
    path = tmp_path / "tensord.service"
    path.write_text(unit)
    r = subprocess.run([exe, "verify", str(path)], capture_output=True, text=True)
    # verify exits 0 on warnings too: any output at all is a finding
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 0 and lines == [], "\n".join(lines)


def test_shipped_config_loads():
    cfg = load_config(str(ROOT / "systemd" / "tensord.toml"))
    assert cfg.socket_mode == 0o660 and cfg.builtin_models


def test_ready_notification(tmp_path, monkeypatch):
    addr = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(addr)
        s.settimeout(60)
        monkeypatch.setenv("NOTIFY_SOCKET", addr)
        d = start_daemon(tmp_path)
        try:
            assert s.recv(64) == b"READY=1"
        finally:
            assert d.stop() == 0
        assert s.recv(64) == b"STOPPING=1"
