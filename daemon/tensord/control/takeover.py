"""Zero-downtime restart, the way nginx upgrades its binary and systemd passes sockets: the
running daemon starts its successor with its listening socket, the successor loads and warms
every model while the old one goes on serving, and only then does the old one stop accepting
(the kernel's accept queue holds whoever connects meanwhile) and drain its sessions (SPEC
`draining`), whose clients reconnect to a daemon that is ready. A successor that fails to
start changes nothing: the old daemon logs why and keeps serving.

    tensord upgrade [--socket PATH] [--pid PID]  # waits for the outcome; exits 1 on failure
    kill -USR2 <daemon pid>                      # the same, without waiting

Under systemd (systemd/tensord.service): ExecReload=tensord upgrade --pid $MAINPID, with
NotifyAccess=all so that the manager takes the new daemon's MAINPID= and, from then on, its
WATCHDOG=1 pings. The new daemon inherits WATCHDOG_PID naming the old one; it pings once it
has said MAINPID= (sdnotify.become_main). The old daemon says nothing to the manager once it
has handed over: its STOPPING=1 would be taken for the service's and stop the new daemon too.

Old daemon (SIGUSR2, `Successor`)               new daemon (`tensord serve`, `Predecessor`)
  pipes ready and go; spawn `tensord serve`  ->   TENSORD_TAKEOVER: listener, ready, go fds
  serving                                         load and warm models
  <- "ready" ------------------------------------
  stop accepting, close metrics listener,
  stop notifying the manager
  "go" ------------------------------------------> accept on the inherited listener,
                                                   MAINPID= to systemd (+ the watchdog)
  <- "main" -------------------------------------
  drain (SIGTERM's path), exit                     READY=1, serve

The old daemon drains only after "main": clients (`tensord upgrade`, hence systemd's reload)
see `draining` only once the manager has been told who the main process is, so systemd never
sees the reload end or the old main process exit before it knows of the new one.

The successor is the same command line (`sys.argv`) run by the same interpreter, so new code
installed in the environment is what it runs. Both processes share the listening socket; the
one that accepts is the one that listens: the handshake on the two pipes makes sure only one
does at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from .. import sdnotify

log = logging.getLogger(__name__)

ENV = "TENSORD_TAKEOVER"  # "listener,ready,go,owns_path" descriptor numbers, for the successor
GO_TIMEOUT = 30.0  # how long a ready successor waits for the old daemon's go
# How long the old daemon waits after go for the successor's "main" (it only has to listen
# and send one datagram); past it, it drains anyway.
MAIN_TIMEOUT = 5.0


class Successor:
    """The old daemon's side: starts one successor at a time and hands over when it is
    ready. `handover` runs on the control loop (via call_soon): it must stop accepting, give
    up the metrics listener and start draining; it returns nothing."""

    def __init__(self, call_soon: Callable[[Callable[[], None]], None]):
        self._call_soon = call_soon
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._handed_over = False

    def start(self, listener: socket.socket | None, owns_path: bool,
              handover: Callable[[Callable[[], None]], None]) -> None:
        """Start the successor (from the control loop). handover(go) is called on the loop
        once the successor is ready; it must call go() once it has stopped accepting."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                log.warning("upgrade: a successor (pid %d) is already starting; ignoring this "
                            "request", self._proc.pid)
                return
            if listener is None:
                log.warning("upgrade: this daemon is draining; nothing to hand over")
                return
            ready_r, ready_w = os.pipe()
            go_r, go_w = os.pipe()
            lfd = listener.fileno()
            env = {**os.environ, ENV: f"{lfd},{ready_w},{go_r},{int(owns_path)}"}
            for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                env.pop(k, None)
            try:
                proc = subprocess.Popen([sys.executable, "-m", "tensord", *sys.argv[1:]],
                                        env=env, pass_fds=(lfd, ready_w, go_r),
                                        stdin=subprocess.DEVNULL)
            except OSError as e:
                for fd in (ready_r, ready_w, go_r, go_w):
                    os.close(fd)
                log.error("upgrade: cannot start the new daemon: %s; this one keeps serving", e)
                return
            os.close(ready_w)
            os.close(go_r)
            self._proc = proc
        log.info("upgrade: started the new daemon (pid %d); serving until it is ready",
                 proc.pid)
        threading.Thread(target=self._wait_ready, args=(proc, ready_r, go_w, handover),
                         name="upgrade", daemon=True).start()

    def _wait_ready(self, proc: subprocess.Popen, ready_r: int, go_w: int,
                    handover: Callable[[Callable[[], None]], None]) -> None:
        said = _read_line(ready_r, None)
        if said != b"ready\n":
            os.close(ready_r)
            os.close(go_w)
            status = proc.wait()
            log.error("upgrade: the new daemon (pid %d) exited with status %s before it was "
                      "ready (its log says why); this daemon keeps serving", proc.pid, status)
            return

        def go() -> None:
            """On the control loop, which has stopped accepting: hand over, and return once
            the successor has told the manager it is the main process (the caller drains
            then). The loop waits for that: a few milliseconds, MAIN_TIMEOUT at most."""
            with self._lock:
                self._handed_over = True
            # The successor is the service from here on: whatever this daemon would still
            # tell the manager (draining, STOPPING=1, watchdog pings) is not the service's.
            os.environ.pop("NOTIFY_SOCKET", None)
            with contextlib.suppress(OSError):
                os.write(go_w, b"go\n")
            os.close(go_w)
            said = _read_line(ready_r, MAIN_TIMEOUT)  # b"": it exited, or predates "main"
            os.close(ready_r)
            if said is None:
                log.warning("upgrade: the new daemon (pid %d) did not say it serves within "
                            "%g s; draining anyway", proc.pid, MAIN_TIMEOUT)
            log.info("upgrade: the new daemon (pid %d) serves the socket now; draining",
                     proc.pid)

        self._call_soon(lambda: handover(go))

    def abandon(self) -> None:
        """This daemon stops before its successor took over (a SIGTERM during an upgrade):
        the successor must not go on to serve a socket nobody hands it, so it is stopped."""
        with self._lock:
            proc = None if self._handed_over else self._proc
        if proc is not None and proc.poll() is None:
            log.warning("upgrade: stopping the new daemon (pid %d): this one stops before it "
                        "took over", proc.pid)
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()


class Predecessor:
    """The successor's side: the listening socket it inherits, and the handshake with the
    daemon it replaces."""

    def __init__(self, listener: socket.socket, ready_w: int, go_r: int, owns_path: bool,
                 pid: int):
        self.listener = listener
        self.owns_path = owns_path
        self.pid = pid  # the daemon this one replaces: it started this one
        self._ready_w, self._go_r = ready_w, go_r

    @classmethod
    def from_env(cls) -> Predecessor | None:
        """The takeover this process was started for, or None."""
        spec = os.environ.pop(ENV, "")
        if not spec:
            return None
        lfd, ready_w, go_r, owns = (int(x) for x in spec.split(","))
        for fd in (lfd, ready_w, go_r):
            os.set_inheritable(fd, False)
        return cls(socket.socket(fileno=lfd), ready_w, go_r, owns == 1, os.getppid())

    def take_over(self) -> None:
        """Tell the old daemon this one is ready (models loaded and warm), then wait for it to
        stop accepting. An old daemon that died meanwhile closes its end: go on alone."""
        with contextlib.suppress(OSError):
            os.write(self._ready_w, b"ready\n")
        end = time.monotonic() + GO_TIMEOUT
        while (left := end - time.monotonic()) > 0:
            r, _, _ = select.select([self._go_r], [], [], left)
            if r:
                break
        else:
            log.warning("upgrade: the old daemon did not hand over within %g s; accepting "
                        "anyway", GO_TIMEOUT)
        os.close(self._go_r)

    def serving(self) -> None:
        """This daemon accepts on the socket now: tell the manager it is the main process (and
        ping its watchdog from now on), then tell the old daemon, which drains once it knows.
        (An old daemon from before "main" has closed its end: nothing to tell.)"""
        sdnotify.become_main(self.pid)
        with contextlib.suppress(OSError):
            os.write(self._ready_w, b"main\n")
        os.close(self._ready_w)

    def failed(self) -> None:
        """This process will not serve (its models did not load): the old one keeps going."""
        for fd in (self._ready_w, self._go_r):
            with contextlib.suppress(OSError):
                os.close(fd)


def _read_line(fd: int, timeout: float | None) -> bytes | None:
    """One line from a pipe, b"" at its end, None when `timeout` seconds passed first."""
    line = b""
    end = None if timeout is None else time.monotonic() + timeout
    while not line.endswith(b"\n"):
        if end is not None:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
        try:
            b = os.read(fd, 1)
        except OSError:
            return b""
        if not b:
            return line
        line += b
    return line


# -- `tensord upgrade` ------------------------------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser("upgrade", help="replace the running daemon without an outage: a new "
                       "one loads its models, takes the socket over, the old one drains")
    p.add_argument("--socket", help="the daemon's socket (default: as for serve)")
    p.add_argument("--pid", type=int, help="the daemon to replace (default: the tensord "
                   "process listening on the socket; under systemd pass $MAINPID)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for the new daemon to load and take over")


def run(args) -> int:
    """Signal the daemon, then wait on a session of its own for its `draining`: the old
    daemon sends it once the new one has taken the socket over."""
    from ..client import Client
    from ..config import default_socket_path
    from ..contract.errors import TensordError

    path = args.socket or default_socket_path()
    try:
        c = Client(path, name="tensord upgrade", request_ring=65536, response_ring=65536)
    except TensordError as e:
        print(f"tensord upgrade: {e.message}", file=sys.stderr)
        return 1
    with c:
        pid = args.pid or _serving_pid(path) or _listener_pid(c.sock)
        problem = _not_a_daemon(pid)
        if problem:
            print(f"tensord upgrade: {problem}", file=sys.stderr)
            return 1
        os.kill(pid, signal.SIGUSR2)
        end = time.monotonic() + args.timeout
        child = None
        while time.monotonic() < end:
            if c.draining:
                new = f" (pid {child})" if child else ""
                print(f"tensord upgrade: the new daemon{new} serves {path}; pid {pid} drains")
                return 0
            kids = children(pid)
            if child is None and kids:
                child = kids[0]
            elif child is not None and child not in kids:
                print(f"tensord upgrade: the new daemon (pid {child}) exited before it was "
                      f"ready; pid {pid} keeps serving (the daemon's log says why)",
                      file=sys.stderr)
                return 1
            if c._closed_reason:
                print(f"tensord upgrade: the daemon closed the connection: {c._closed_reason}",
                      file=sys.stderr)
                return 1
            time.sleep(0.05)
    print(f"tensord upgrade: no handover within {args.timeout:g} s; pid {pid} still serves",
          file=sys.stderr)
    return 1


def _serving_pid(path: str) -> int | None:
    """The tensord process holding the socket listening on path (/proc/net/unix gives the
    socket's inode, /proc/PID/fd who holds it): after an upgrade that is the new daemon, the
    old one having closed its copy. None when it cannot be told (another user's process)."""
    inodes = set()
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        for line in f.read().splitlines()[1:]:
            parts = line.split()
            # Num RefCount Protocol Flags Type St Inode Path; St 01: listening
            if len(parts) >= 8 and parts[7] == os.path.abspath(path) and parts[5] == "01":
                inodes.add(f"socket:[{parts[6]}]")
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
                   for fd in os.listdir(f"/proc/{pid}/fd")) and not _not_a_daemon(int(pid)):
                found.add(int(pid))
    return found.pop() if len(found) == 1 else None


def _listener_pid(sock: socket.socket) -> int:
    """SO_PEERCRED of a client socket: the process that created the listening socket."""
    import struct

    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)[0]


def _not_a_daemon(pid: int) -> str | None:
    """Why pid is not a tensord daemon to signal, or None. The socket's creator is not the
    daemon when systemd made it (socket activation) or an earlier upgrade replaced it."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return (f"the process that created the socket (pid {pid}) is gone (an earlier "
                "upgrade replaced it): pass --pid of the daemon serving it")
    if b"tensord" not in b" ".join(argv) or b"serve" not in argv:
        what = b" ".join(argv)[:80].decode(errors="replace")
        return (f"pid {pid} is not a tensord daemon ({what}): pass --pid of the daemon "
                "(under systemd: --pid $MAINPID)")
    return None


def children(pid: int) -> list[int]:
    """Child processes of pid (/proc/PID/task/*/children)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out
