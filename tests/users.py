"""Test users and running commands as them, for the tests of the multi-user deployment.

CI runs as root and may create users (`useradd`); the users are kept between runs (nothing
needs deleting, and concurrent runs share them). `as_user` wraps a command so that it runs with
that user's uid, gid and groups (`setpriv`). This machine's Python lives under /root (mode
0700), which other users cannot enter: then the command runs in a private mount namespace in
which /root is a world-readable tmpfs that holds only the needed subtree (a bind mount of the
real one), so the very same interpreter and virtual environment run. Nothing outside that
namespace changes.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

DAEMON_USER = "tensord-t"  # the daemon's own unprivileged user (the unit's `tensord`)
CLIENT_A = "tdclient-a"  # two clients of other uids, in the daemon's group
CLIENT_B = "tdclient-b"
OUTSIDER = "tdoutsider"  # a local user outside the group


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create test users (CI runs as root)")
    for tool in ("useradd", "setpriv", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def ensure_user(name: str, groups: tuple[str, ...] = ()) -> pwd.struct_passwd:
    """Create a system user (with its own group) unless it exists; add it to `groups`."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        r = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                            "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                           capture_output=True, text=True)
        # 9: it exists (a concurrent run made it first)
        assert r.returncode in (0, 9), r.stderr
        pw = pwd.getpwnam(name)
    for g in groups:
        if name not in grp.getgrnam(g).gr_mem:
            subprocess.run(["usermod", "--append", "--groups", g, name], check=True)
    return pw


def deployment_users() -> dict[str, pwd.struct_passwd]:
    """The daemon's user, two clients in its group and one outsider."""
    need_root()
    users = {DAEMON_USER: ensure_user(DAEMON_USER)}
    for c in (CLIENT_A, CLIENT_B):
        users[c] = ensure_user(c, (DAEMON_USER,))
    users[OUTSIDER] = ensure_user(OUTSIDER)
    return users


def _closed_ancestors() -> list[tuple[Path, str]]:
    """(directory others cannot enter, its child on the way) for each path a Python process
    of another user needs: the interpreter's prefix, the venv and the repository."""
    needed = {Path(os.path.realpath(sys.executable)), Path(sys.base_prefix).resolve(),
              Path(sys.prefix).resolve(), ROOT}
    out: list[tuple[Path, str]] = []
    for p in needed:
        for parent in [*reversed(p.parents)][1:]:
            if not os.stat(parent).st_mode & 0o001:
                child = p.relative_to(parent).parts[0]
                if (parent, child) not in out:
                    out.append((parent, child))
                break
    return out


def as_user(user: str, argv: list[str]) -> list[str]:
    """argv run as `user` (uid, gid, supplementary groups), its capabilities dropped."""
    need_root()
    drop = ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}",
            "--init-groups", "--inh-caps=-all", "--"]
    closed = _closed_ancestors()
    if not closed:
        return drop + argv
    lines = ["set -e", 'stash=$(mktemp -d)']
    for i, (parent, child) in enumerate(closed):
        p, c = shlex.quote(str(parent)), shlex.quote(child)
        if not os.stat(parent / child).st_mode & 0o001:
            pytest.skip(f"{parent / child} cannot be entered by other users")
        lines += [f"mkdir $stash/{i}", f"mount --bind {p} $stash/{i}",
                  f"mount -t tmpfs -o mode=0755 tmpfs {p}", f"mkdir {p}/{c}",
                  f"mount --bind $stash/{i}/{c} {p}/{c}", f"umount $stash/{i}"]
    lines += ['rm -r "$stash"', 'exec "$@"']
    # unshare's default propagation is private: nothing of this is seen outside
    return ["unshare", "--mount", "sh", "-c", "\n".join(lines), "sh", *drop, *argv]


def shared_dir(prefix: str) -> Path:
    """A fresh directory under /tmp that every test user may enter and read (pytest's own
    tmp_path is root's, mode 0700). The caller removes it."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    return d


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment for a test user's process: a writable HOME of its own, the tests'
    helper modules importable, no bytecode written into the (root-owned) repository."""
    home.mkdir(exist_ok=True)
    home.chmod(0o777)
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home), PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=str(ROOT / "tests"), **extra)
    return env


def start_as(user: str, d: Path, config: str = "", *args: str, mode: int = 0o755):
    """Start a daemon as `user` (non-root) with its socket in its own runtime directory under
    `d` (a shared_dir), owned by the user with `mode` (systemd's /run/tensord: 0750)."""
    from conftest import Daemon

    log = d / "daemon.log"
    cfg = d / "tensord.toml"
    cfg.write_text(config)
    cfg.chmod(0o644)
    run = d / f"run-{user}"
    run.mkdir(exist_ok=True)
    pw = pwd.getpwnam(user)
    os.chown(run, pw.pw_uid, pw.pw_gid)
    run.chmod(mode)
    sock = run / "tensord.sock"
    argv = as_user(user, [sys.executable, "-m", "tensord", "serve", "--socket", str(sock),
                          "--config", str(cfg), *args])
    with open(log, "a") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                env=user_env(d / f"home-{user}"))
    daemon = Daemon(proc, str(sock), log)
    end = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"daemon exited with {proc.returncode}:\n{daemon.logs()}"
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            return daemon
        assert time.monotonic() < end, daemon.logs()
        time.sleep(0.05)
