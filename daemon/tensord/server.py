"""The listening socket: accepts clients and runs one Connection thread per client."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading

from .admin import ModelControl
from .config import DaemonConfig
from .connection import Connection, SessionCounter
from .executor import Executor
from .models.registry import Registry
from .transport.segment import sweep_stale

log = logging.getLogger(__name__)


class AddressInUse(RuntimeError):
    pass


class Server:
    def __init__(self, config: DaemonConfig, registry: Registry, executor: Executor):
        self.config = config
        self.registry = registry
        self.executor = executor
        self.control = ModelControl(registry, executor)
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
            except OSError:
                if self._stopping.is_set():
                    break
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
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for c in conns:
            c.close("daemon is shutting down")
        for t in threads:
            t.join(timeout=10)
        if self._listener is not None:
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        log.info("stopped")


def _claim_path(path: str) -> None:
    """Remove a socket file left by a dead daemon; refuse if a live one answers on it."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return
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
