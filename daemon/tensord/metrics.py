"""Prometheus metrics, and the optional listener that serves them (off by default).

    [daemon]
    metrics = "127.0.0.1:9464"                 # loopback TCP, or:
    metrics = "unix:/run/tensord/metrics.sock"  # a Unix socket (mode: socket_mode)

Per-request metrics (requests by model and outcome, durations, batch sizes, retries) are the
native serving core's counters, read at scrape time (`use_core`): nothing runs per request
for them. The control loop keeps the session, memory and connection gauges and counts refused
clients through the functions below, which return at once while the listener is off.

The listener is one thread that serves one scrape at a time (GET /metrics, HTTP/1.0 style,
the connection closed after the answer), each bounded by a socket timeout, so a slow or
hostile scraper costs that thread and nothing else.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from . import __version__

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
SECONDS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1,
           0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The families the serving core's counters fill (CoreCollector), by name and help text.
_CORE_COUNTERS = {
    "tensord_requests": "Requests answered, by model and outcome (ok, or the SPEC error name)",
    "tensord_batch_retries": "Forward passes run again in halves after a batch failed, so "
                             "only the requests that fail alone get the error",
}
_CORE_HISTOGRAMS = {
    "tensord_request_duration_seconds": "From reading a request's record to writing its "
                                        "response",
    "tensord_queue_duration_seconds": "Time a request waited for its model",
    "tensord_compute_duration_seconds": "Forward-pass time of a batch",
    "tensord_batch_size": "Requests per forward pass",
}
_SECONDS_BOUNDS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZE_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class CoreCollector:
    """Prometheus families from the serving core's counters, read when scraped."""

    def __init__(self) -> None:
        self.source: Callable[[], list] | None = None

    def describe(self):
        return []

    def collect(self):
        rows = self.source() if self.source is not None else []
        requests = CounterMetricFamily("tensord_requests", _CORE_COUNTERS["tensord_requests"],
                                       labels=["model", "outcome"])
        retries = CounterMetricFamily("tensord_batch_retries",
                                      _CORE_COUNTERS["tensord_batch_retries"], labels=["model"])
        hists = {name: HistogramMetricFamily(name, doc, labels=["model"])
                 for name, doc in _CORE_HISTOGRAMS.items()}
        names = list(_CORE_HISTOGRAMS)
        for model, outcomes, histograms, retried in rows:
            for outcome, n in outcomes:
                requests.add_metric([model, outcome], n)
            retries.add_metric([model], retried)
            for name, (counts, total) in zip(names, histograms):
                bounds = _SIZE_BOUNDS if name == "tensord_batch_size" else _SECONDS_BOUNDS
                if not counts:
                    counts = [0] * (len(bounds) + 1)
                acc, buckets = 0, []
                for bound, c in zip([*map(str, bounds), "+Inf"], counts):
                    acc += c
                    buckets.append((bound, acc))
                hists[name].add_metric([model], buckets, total)
        yield requests
        yield retries
        yield from hists.values()


CORE = CoreCollector()
REGISTRY.register(CORE)


def use_core(source: Callable[[], list]) -> None:
    """Read per-request metrics from the serving core (tensord._core.Engine.metrics)."""
    CORE.source = source


SESSIONS = Gauge("tensord_sessions", "Sessions (admitted handshakes) now", registry=REGISTRY)
SHARED_MEMORY = Gauge("tensord_shared_memory_bytes", "Bytes of session segments now",
                      registry=REGISTRY)
PENDING = Gauge("tensord_pending_connections", "Connections that have not completed hello",
                registry=REGISTRY)
REJECTED = Counter("tensord_rejected_clients_total", "Connections refused or ended before their "
                   "session started, by reason", ["reason"], registry=REGISTRY)
INFO = Gauge("tensord_build_info", "The daemon's version", ["version"], registry=REGISTRY)

_on = False
_children: dict[tuple, object] = {}


def enabled() -> bool:
    return _on


def set_gauges(sessions: int, shared_memory: int, pending: int) -> None:
    if _on:
        SESSIONS.set(sessions)
        SHARED_MEMORY.set(shared_memory)
        PENDING.set(pending)


def rejected(reason: str) -> None:
    if _on:
        REJECTED.labels(reason).inc()


def render() -> bytes:
    return generate_latest(REGISTRY)


# -- the listener -------------------------------------------------------------------------------

class Listener:
    """Serves GET /metrics on one socket, from one thread."""

    def __init__(self, address: str, socket_mode: int = 0o660):
        self.path = ""
        if address.startswith("unix:"):
            self.path = address[len("unix:"):]
            _claim(self.path)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(self.path)
            os.chmod(self.path, socket_mode)
            self.where = f"unix:{self.path}"
        else:
            host, port = parse_tcp(address)
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.sock = socket.socket(fam, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            bound = self.sock.getsockname()
            self.where = f"http://{host if fam == socket.AF_INET else f'[{host}]'}:{bound[1]}"
            if not ipaddress.ip_address(host).is_loopback:
                log.warning("metrics listen on %s, not a loopback address: anyone who can reach "
                            "it reads model names and load", self.where)
        self.sock.listen(16)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="metrics", daemon=True)

    def start(self) -> None:
        global _on
        _on = True
        INFO.labels(__version__).set(1)
        self._thread.start()
        log.info("metrics on %s/metrics", self.where)

    def close(self) -> None:
        global _on
        _on = False
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if self.path:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._closed:
                    return
                threading.Event().wait(0.1)  # out of descriptors: try again shortly
                continue
            with conn:
                conn.settimeout(5.0)
                try:
                    _answer(conn)
                except OSError:
                    pass
                except Exception:  # never let a scrape end the listener
                    log.exception("metrics scrape failed")


def _answer(conn: socket.socket) -> None:
    req = b""
    while b"\r\n\r\n" not in req and b"\n\n" not in req and len(req) < 8192:
        chunk = conn.recv(4096)
        if not chunk:
            break
        req += chunk
    parts = req.split(b"\r\n", 1)[0].split()
    if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
        _reply(conn, b"405 Method Not Allowed", b"text/plain", b"GET /metrics\n")
    elif parts[1].split(b"?")[0] not in (b"/metrics", b"/"):
        _reply(conn, b"404 Not Found", b"text/plain", b"GET /metrics\n")
    else:
        body = render()
        _reply(conn, b"200 OK", CONTENT_TYPE_LATEST.encode(),
               b"" if parts[0] == b"HEAD" else body, len(body))


def _reply(conn: socket.socket, status: bytes, ctype: bytes, body: bytes,
           length: int | None = None) -> None:
    head = (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
            + str(len(body) if length is None else length).encode()
            + b"\r\nConnection: close\r\n\r\n")
    conn.sendall(head + body)


def parse_tcp(address: str) -> tuple[str, int]:
    """'127.0.0.1:9464' or '[::1]:9464' -> (host, port); ValueError when it is neither."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"metrics address {address!r} is not HOST:PORT or unix:PATH")
    if host == "localhost":
        host = "127.0.0.1"
    ipaddress.ip_address(host)  # ValueError for names: listen on an address, not a name
    return host, int(port)


def _claim(path: str) -> None:
    """Remove a stale socket file left by a dead daemon; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"something is listening on {path} already")
