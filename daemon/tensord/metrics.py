"""Prometheus metrics, and the optional listener that serves them (off by default).

    [daemon]
    metrics = "127.0.0.1:9464"                 # loopback TCP, or:
    metrics = "unix:/run/tensord/metrics.sock"  # a Unix socket (mode: socket_mode)

Per-request metrics (requests by model and outcome, durations, batch sizes, retries) are the
native serving core's counters, read at scrape time (`use_core`): nothing runs per request
for them. The control loop keeps the session, memory and connection gauges and counts refused
clients through the functions below, which return at once while the listener is off.

The listener is prometheus_client's WSGI app served by its threaded WSGI server (a thread
per connection, one request per connection), with two bounds that server lacks, so a slow
or hostile client cannot starve scrapes: every connection must complete its request and
take its answer within REQUEST_DEADLINE_S (a reaper cuts it then, however it trickles), and
at most MAX_CONNECTIONS are served at once (one more cuts the oldest, which cannot be a
healthy scrape: those take milliseconds).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from socketserver import TCPServer
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

from . import __version__
from .unixsock import claim

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
DISPATCH_PASS = Gauge("tensord_dispatch_longest_pass_seconds", "The longest the dispatcher spent "
                      "on one session's records in one pass, since start: every other "
                      "session's intake waited that long", registry=REGISTRY)
INFO = Gauge("tensord_build_info", "The daemon's version", ["version"], registry=REGISTRY)

_on = False


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

REQUEST_DEADLINE_S = 10.0  # a scrape takes milliseconds; Prometheus' own default timeout is 10 s
MAX_CONNECTIONS = 16


class Listener:
    """Serves GET /metrics on one socket: a thread per connection, at most MAX_CONNECTIONS,
    each cut after REQUEST_DEADLINE_S."""

    def __init__(self, address: str, socket_mode: int = 0o660):
        self.path = ""
        if address.startswith("unix:"):
            self.path = address[len("unix:"):]
            claim(self.path, "[daemon] metrics")
            self.server: _Server = _UnixServer(self.path, socket_mode)
            self.where = f"unix:{self.path}"
        else:
            host, port = parse_tcp(address)
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.server = _TCPServer((host, port), fam)
            bound = self.server.socket.getsockname()
            self.where = f"http://{host if fam == socket.AF_INET else f'[{host}]'}:{bound[1]}"
            if not ipaddress.ip_address(host).is_loopback:
                log.warning("metrics listen on %s, not a loopback address: anyone who can reach "
                            "it reads model names and load", self.where)
        self.server.set_app(_only_metrics(make_wsgi_app(REGISTRY)))
        self._threads = [threading.Thread(target=self.server.serve_forever, name="metrics",
                                          daemon=True),
                         threading.Thread(target=self.server.reap, name="metrics-reaper",
                                          daemon=True)]

    def start(self) -> None:
        global _on
        _on = True
        INFO.labels(__version__).set(1)
        for t in self._threads:
            t.start()
        log.info("metrics on %s/metrics", self.where)

    def close(self) -> None:
        global _on
        _on = False
        if self._threads[0].is_alive():
            self.server.shutdown()  # serve_forever returns (it waits for that if never started)
        self.server.cut_all()  # and the reaper ends
        self.server.server_close()
        if self.path:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def _only_metrics(app):
    """prometheus_client answers any path; the listener answers /metrics (and /) only."""
    def only(environ, start_response):
        if environ.get("PATH_INFO") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"GET /metrics\n"]
        return app(environ, start_response)
    return only


class _Quiet(WSGIRequestHandler):
    """One request per connection, nothing logged per request."""

    timeout = REQUEST_DEADLINE_S  # per read or write; the reaper bounds the whole request

    def log_message(self, format, *args) -> None:
        pass

    def address_string(self) -> str:  # a Unix socket's peer has no address
        return str(self.client_address[0]) if self.client_address else "local"


class _Server(ThreadingWSGIServer):
    """prometheus_client's threaded server, bounded: connections are tracked from accept to
    close; the oldest is cut when there are too many, any is cut at its deadline."""

    request_queue_size = 16

    def init_bounds(self) -> None:
        self._live: dict[socket.socket, float] = {}  # connection -> its deadline
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def process_request(self, request, client_address):
        with self._lock:
            if len(self._live) >= MAX_CONNECTIONS:
                # a cut connection leaves the count at once (its thread ends shortly)
                oldest = min(self._live, key=self._live.__getitem__)
                del self._live[oldest]
                _cut(oldest)
            self._live[request] = time.monotonic() + REQUEST_DEADLINE_S
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._lock:
            self._live.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        pass  # a cut or broken connection; a scrape never ends the listener

    def reap(self) -> None:
        while not self._stopped.wait(0.25):
            now = time.monotonic()
            with self._lock:
                for conn in [c for c, deadline in self._live.items() if deadline <= now]:
                    del self._live[conn]
                    _cut(conn)

    def cut_all(self) -> None:
        self._stopped.set()
        with self._lock:
            for conn in self._live:
                _cut(conn)


def _cut(conn: socket.socket) -> None:
    """Unblock whatever the connection's thread is doing; it then closes the connection."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


class _TCPServer(_Server):
    def __init__(self, address: tuple[str, int], family: int):
        self.address_family = family
        self.allow_reuse_address = True
        self.init_bounds()
        super().__init__(address, _Quiet)


class _UnixServer(_Server):
    address_family = socket.AF_UNIX

    def __init__(self, path: str, mode: int):
        self._path, self._mode = path, mode
        self.init_bounds()
        super().__init__(path, _Quiet)  # type: ignore[arg-type]  # AF_UNIX: a path

    def server_bind(self) -> None:
        TCPServer.server_bind(self)  # HTTPServer's would resolve a host name
        os.chmod(self._path, self._mode)
        self.server_name, self.server_port = "localhost", 0
        self.setup_environ()

    def get_request(self):
        conn, _ = self.socket.accept()
        return conn, ("local", 0)


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
