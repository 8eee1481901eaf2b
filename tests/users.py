"""Test users and running commands as them, for the tests of the multi-user deployment.

Tests leave the machine as they found them. `ensure_user` creates a system user (and its
group) only when it does not exist, and everything it creates or changes is undone after the
test, pass or fail (`remove_made`, called by an autouse fixture in conftest.py): users made
are deleted with their groups, group memberships added to users that were there before are
taken back. Names carry a per-run suffix (`unique`), so two runs on one machine never share
or delete each other's users. `as_user` wraps a command so that it runs with that user's
uid, gid and groups (`setpriv`). When this machine's Python lives under a directory other
users cannot enter (/root, mode 0700), the command runs in a private mount namespace in
which that directory is a world-readable tmpfs holding only the needed subtree (a bind
mount of the real one), so the very same interpreter and virtual environment run; nothing
outside that namespace changes.

Tests that need these powers check for the capabilities themselves, not for uid 0, and skip
with the reason where they are missing (root in an unprivileged container has uid 0 but may
lack CAP_SETUID, or may not mount).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
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

# A suffix for this run's user names (system names: at most 32 characters).
_SUFFIX = f"{os.getpid() % 100000:05d}"


def unique(name: str) -> str:
    """`name` made this run's own."""
    return f"{name}{_SUFFIX}"


DAEMON_USER = unique("tensord-t")  # the daemon's own unprivileged user (the unit's `tensord`)
CLIENT_A = unique("tdclient-a")  # two clients of other uids, in the daemon's group
CLIENT_B = unique("tdclient-b")
OUTSIDER = unique("tdoutsider")  # a local user outside the group

# Linux capability numbers (linux/capability.h)
CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_SETGID, CAP_SETUID, CAP_SYS_ADMIN = 0, 1, 6, 7, 21


def has_capability(cap: int) -> bool:
    """Whether this process holds `cap` in its effective set."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def need_users() -> None:
    """Skip unless this process can create users and run commands as them."""
    for cap, name in ((CAP_SETUID, "CAP_SETUID"), (CAP_SETGID, "CAP_SETGID"),
                      (CAP_CHOWN, "CAP_CHOWN"), (CAP_DAC_OVERRIDE, "CAP_DAC_OVERRIDE")):
        if not has_capability(cap):
            pytest.skip(f"needs {name} to create test users and run as them (CI runs as root)")
    for tool in ("useradd", "userdel", "groupdel", "gpasswd", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not os.access("/etc/passwd", os.W_OK) or not os.access("/etc/group", os.W_OK):
        pytest.skip("/etc/passwd or /etc/group is not writable here: cannot create test users")


need_root = need_users  # the name older tests use


@functools.cache
def _can_mount_privately() -> str:
    """'' when a private mount namespace with a tmpfs mount works here, else why not."""
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    if not has_capability(CAP_SYS_ADMIN):
        return "needs CAP_SYS_ADMIN for a private mount namespace"
    r = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /tmp"],
                       capture_output=True, text=True)
    return "" if r.returncode == 0 else f"cannot mount in a private namespace: {r.stderr.strip()}"


def need_private_mounts() -> None:
    why = _can_mount_privately()
    if why:
        pytest.skip(why)


# -- what this run made, undone after each test --------------------------------------------

_made_users: list[str] = []  # in creation order
_added_to_groups: list[tuple[str, str]] = []  # (user that was there before, group)


def ensure_user(name: str, groups: tuple[str, ...] = ()) -> pwd.struct_passwd:
    """A system user with its own group (created unless it exists), in `groups`. Whatever
    this creates or changes is undone by `remove_made` after the test."""
    need_users()
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        r = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                            "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                            *(["--groups", ",".join(groups)] if groups else []), name],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        _made_users.append(name)
        return pwd.getpwnam(name)
    for g in groups:
        if name not in grp.getgrnam(g).gr_mem:
            subprocess.run(["gpasswd", "--add", name, g], check=True, capture_output=True)
            if name not in _made_users:
                _added_to_groups.append((name, g))
    return pw


def remove_made() -> None:
    """Delete the users this run made (newest first, so a group loses its members before
    its owner goes) and their groups; take back group memberships added to other users."""
    errors = []
    while _added_to_groups:
        name, g = _added_to_groups.pop()
        r = subprocess.run(["gpasswd", "--delete", name, g], capture_output=True, text=True)
        if r.returncode != 0:
            errors.append(r.stderr)
    while _made_users:
        name = _made_users.pop()
        for attempt in range(50):
            # 8: a process of the user is still exiting; a test stops what it started, so
            # this only waits for the kernel to reap it
            r = subprocess.run(["userdel", *(["--force"] if attempt == 49 else []), name],
                               capture_output=True, text=True)
            if r.returncode != 8:
                break
            time.sleep(0.1)
        if r.returncode not in (0, 6):  # 6: it is gone already
            errors.append(r.stderr)
        with contextlib.suppress(KeyError):
            grp.getgrnam(name)  # userdel keeps a user group that still has members
            subprocess.run(["groupdel", name], capture_output=True)
    assert not errors, f"could not undo the test users: {errors}"


atexit.register(remove_made)  # a run that stops between a test and its teardown


def deployment_users() -> dict[str, pwd.struct_passwd]:
    """The daemon's user, two clients in its group and one outsider."""
    need_users()
    users = {DAEMON_USER: ensure_user(DAEMON_USER)}
    for c in (CLIENT_A, CLIENT_B):
        users[c] = ensure_user(c, (DAEMON_USER,))
    users[OUTSIDER] = ensure_user(OUTSIDER)
    return users


def _closed_ancestors() -> dict[Path, list[str]]:
    """Directories others cannot enter, each with its children on the way to a path a Python
    process of another user needs: the interpreter's prefix, the venv, and the repository's
    daemon/ (the editable install's source) and tests/ (the tests' handlers). The repository
    itself may be closed (a clone in a `mktemp -d` directory, mode 0700)."""
    needed = {Path(os.path.realpath(sys.executable)), Path(sys.base_prefix).resolve(),
              Path(sys.prefix).resolve(), ROOT / "daemon", ROOT / "tests"}
    out: dict[Path, list[str]] = {}
    for p in needed:
        for parent in [*reversed(p.parents)][1:]:
            if not os.stat(parent).st_mode & 0o001:
                child = p.relative_to(parent).parts[0]
                if child not in out.setdefault(parent, []):
                    out[parent].append(child)
                break
    return out


def as_user(user: str, argv: list[str], mounts: tuple[str, ...] = ()) -> list[str]:
    """argv run as `user` (uid, gid, supplementary groups), its capabilities dropped.
    `mounts`: shell lines run as root in the command's private mount namespace first."""
    need_users()
    drop = ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}",
            "--init-groups", "--inh-caps=-all", "--"]
    closed = _closed_ancestors()
    if not closed and not mounts:
        return drop + argv
    need_private_mounts()
    lines = ["set -e", 'stash=$(mktemp -d)']
    for i, (parent, children) in enumerate(closed.items()):
        p = shlex.quote(str(parent))
        lines += [f"mkdir $stash/{i}", f"mount --bind {p} $stash/{i}",
                  f"mount -t tmpfs -o mode=0755 tmpfs {p}"]
        for child in children:  # every child on one tmpfs: a second would hide the first
            if not os.stat(parent / child).st_mode & 0o001:
                pytest.skip(f"{parent / child} cannot be entered by other users")
            c = shlex.quote(child)
            lines += [f"mkdir {p}/{c}", f"mount --bind $stash/{i}/{c} {p}/{c}"]
        lines.append(f"umount $stash/{i}")
    lines += ['rm -r "$stash"', *mounts, 'exec "$@"']
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


def start_as(user: str, d: Path, config: str = "", *args: str, mode: int = 0o755,
             mounts: tuple[str, ...] = ()):
    """Start a daemon as `user` (non-root) with its socket in its own runtime directory under
    `d` (a shared_dir), owned by the user with `mode` (systemd's /run/tensord: 0750);
    `mounts` as for as_user."""
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
                          "--config", str(cfg), *args], mounts)
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
