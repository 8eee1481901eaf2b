"""The listening socket: accepts clients and runs one Connection thread per client."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import threading
import time

from .admin import ModelControl
from .config import DaemonConfig
from .connection import Connection, SessionCounter
from .executor import Executor
from .models.registry import Registry
from .transport.segment import sweep_stale

log = logging.getLogger(__name__)


_TRANSIENT_ACCEPT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}


class AddressInUse(RuntimeError):
    pass


class Server:
    def __init__(self, config: DaemonConfig, registry: Registry, executor: Executor):
        self.config = config
        self.registry = registry
        self.executor = executor
        self.control = ModelControl(registry, executor, config.base_dir)
        self.path = config.socket_path()
        self.sessions = SessionCounter(config.max_sessions)
        self._conns: set[Connection] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None

    def listen(self) -> None:
        removed = sweep_stale()
        if removed:
            log.warning("removed %d stale shared-memory entries of dead daemons", len(removed))
        _claim_path(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        os.chmod(self.path, self.config.socket_mode)
        s.listen(128)
        s.settimeout(0.2)  # so serve_forever notices shutdown()
        self._listener = s
        log.info("listening on %s, models: %s", self.path,
                 ", ".join(m.name for m in self.registry.infos()))

    def serve_forever(self) -> None:
        assert self._listener is not None, "call listen() first"
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._stopping.is_set():
                    break
                if e.errno in _TRANSIENT_ACCEPT:
                    # Out of file descriptors or memory: refuse this one, keep serving the
                    # others, retry after a pause instead of spinning.
                    log.warning("accept failed (%s); raise LimitNOFILE or max_sessions "
                                "headroom", e)
                    time.sleep(0.1)
                    continue
                raise
            sock.settimeout(None)
            try:
                conn = Connection(sock, self.config, self.registry, self.executor, self.sessions,
                                  self.control)
            except OSError as e:
                log.warning("dropping a connection: %s", e)
                sock.close()
                continue
            t = threading.Thread(target=self._run_conn, args=(conn,), daemon=True,
                                 name=f"conn-{conn.peer.pid}")
            with self._lock:
                self._conns.add(conn)
                self._threads.add(t)
            t.start()
        self._close()

    def _run_conn(self, conn: Connection) -> None:
        try:
            conn.run()
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())

    def shutdown(self) -> None:
        self._stopping.set()

    def _close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for c in conns:
            c.close("daemon is shutting down")
        deadline = time.monotonic() + 10
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        log.info("stopped")


def _claim_path(path: str) -> None:
    """Remove a socket file left by a dead daemon; refuse if a live one answers on it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AddressInUse(f"{path} exists and is not a socket; remove it or use --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError as e:
        raise AddressInUse(f"{path} exists and is not a usable socket ({e}); remove it") from None
    finally:
        probe.close()
    raise AddressInUse(f"another daemon is listening on {path}; stop it or use --socket")
