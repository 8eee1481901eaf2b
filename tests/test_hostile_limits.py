"""What one uid may hold by default (issue 19.7): max_sessions_per_uid was unlimited, so a
single misbehaving service could take every session and lock the others out. Unset, a uid
may hold a quarter of max_sessions and a quarter of the session memory."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys

import pytest
from conftest import start_daemon
from users import as_user, ensure_user, need_root, shared_dir, user_env

from tensord.client import Client
from tensord.config import DaemonConfig, load_config
from tensord.contract.errors import ResourceError
from tensord.contract.layout import segment_size

SMALL = {"request_ring": 65536, "response_ring": 65536}

OTHER_UID_CLIENT = """
import sys
from tensord.client import Client
with Client(sys.argv[1], request_ring=65536, response_ring=65536) as c:
    c.ping()
print("ok")
"""


def test_the_defaults_are_a_quarter_of_the_whole(tmp_path):
    from tensord.control.limits import per_uid_limits

    cfg = DaemonConfig()
    sessions, _, memory = per_uid_limits(cfg)
    assert sessions == cfg.max_sessions // 4 == 16
    assert memory > 0
    cfg.max_memory = 8 << 30
    assert per_uid_limits(cfg)[2] == 2 << 30
    # 0 still means no bound, when written
    (tmp_path / "t.toml").write_text("[daemon]\nmax_sessions_per_uid = 0\n"
                                     "max_memory_per_uid = 0\n")
    assert per_uid_limits(load_config(str(tmp_path / "t.toml"))) == (0, 0, 0)


def test_one_uid_cannot_take_every_session_by_default(tmp_path):
    """A default daemon (max_sessions 64): root's 17th session is refused, naming the
    setting, and another uid still gets in."""
    d = shared_dir("tensord-share-") if _can_switch_users() else tmp_path
    daemon = start_daemon(d, config="[daemon]\nsocket_mode = 0o666\n")
    clients: list[Client] = []
    try:
        for _ in range(16):
            clients.append(Client(daemon.path, **SMALL))
        with pytest.raises(ResourceError, match="max_sessions_per_uid=16"):
            Client(daemon.path, **SMALL)
        if _can_switch_users():
            user = ensure_user("tdquota")
            (d / "client.py").write_text(OTHER_UID_CLIENT)
            r = subprocess.run(as_user(user.pw_name, [sys.executable, str(d / "client.py"),
                                                      daemon.path]),
                               capture_output=True, text=True, env=user_env(d / "home"),
                               timeout=300)
            assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
        clients.pop().close()
        clients.append(_retry(lambda: Client(daemon.path, **SMALL)))  # the slot is free again
    finally:
        for c in clients:
            c.close()
        assert daemon.stop() == 0, daemon.logs()
        if d is not tmp_path:
            shutil.rmtree(d)


def test_one_uid_gets_a_quarter_of_max_memory_by_default(tmp_path):
    ring = 1 << 20
    seg = segment_size(ring, ring)
    daemon = start_daemon(tmp_path, config=f"[daemon]\nmax_memory = {8 * seg}\n")
    clients: list[Client] = []
    try:
        for _ in range(2):
            clients.append(Client(daemon.path, request_ring=ring, response_ring=ring))
        with pytest.raises(ResourceError, match="max_memory_per_uid"):
            Client(daemon.path, request_ring=ring, response_ring=ring)
    finally:
        for c in clients:
            c.close()
        assert daemon.stop() == 0, daemon.logs()


def _can_switch_users() -> bool:
    try:
        need_root()
    except pytest.skip.Exception:
        return False
    return True


def _retry(fn, tries: int = 200):
    """The daemon frees a slot when it reads the goodbye: try until it has."""
    import time

    for _ in range(tries - 1):
        with contextlib.suppress(ResourceError):
            return fn()
        time.sleep(0.02)
    return fn()
