"""The systemd protocols the daemon speaks, without libsystemd: readiness, status and watchdog
notifications (one datagram each to $NOTIFY_SOCKET) and socket activation (LISTEN_FDS)."""

from __future__ import annotations

import contextlib
import os
import socket

SD_LISTEN_FDS_START = 3


def notify(state: str) -> bool:
    """Send one notification ("READY=1", "STATUS=...", "WATCHDOG=1", ...); False when there is
    no manager to tell, or it cannot be told (a notification is never worth failing for)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 notifications the manager wants (half its WatchdogSec=, as
    sd_watchdog_enabled(3) advises), or None when it wants none, or none from this process
    (WATCHDOG_PID names another: the manager watches its main process)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def become_main(predecessor: int) -> None:
    """Tell the manager that this process is the service's main process from now on, in place
    of `predecessor`, which started it (a zero-downtime upgrade, control/takeover.py): MAINPID=,
    which the manager takes from a process other than the main one under NotifyAccess=all.
    The watchdog then watches this process, so WATCHDOG_PID, inherited from the predecessor
    and naming it, is made to name this one: watchdog_interval() answers for this process
    from here on, and the next successor inherits the right pid."""
    notify(f"MAINPID={os.getpid()}")
    if os.environ.get("WATCHDOG_PID") == str(predecessor):
        os.environ["WATCHDOG_PID"] = str(os.getpid())


def listen_fds() -> list[socket.socket]:
    """Sockets the manager passed (socket activation, sd_listen_fds(3)): descriptors 3, 4, ...
    when LISTEN_PID is this process. The variables are removed so that children do not
    inherit them; the descriptors are made close-on-exec."""
    pid, n = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(k, None)
    if pid != str(os.getpid()) or not n.isdigit():
        return []
    out = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(n)):
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
        out.append(socket.socket(fileno=fd))
    return out
