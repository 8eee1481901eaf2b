"""Prometheus metrics: off by default, served on a Unix socket or loopback TCP when asked, and
what they say follows what the daemon does (checked by scraping, as Prometheus would)."""

from __future__ import annotations

import re
import socket
import time

import pytest
import torch
from conftest import start_daemon
from prometheus_client.parser import text_string_to_metric_families

from tensord import metrics
from tensord.client import Client
from tensord.contract.errors import ResourceError
from tensord.contract.frames import encode_frame, read_frame
from tensord.contract.messages import Error, Hello


def http_get(sock: socket.socket, path: str = "/metrics") -> tuple[str, str]:
    with sock:
        sock.settimeout(30)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: tensord\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return head.split("\r\n", 1)[0], body


def scrape_unix(path: str) -> dict:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    status, body = http_get(s)
    assert status == "HTTP/1.1 200 OK", status
    return parse(body)


def parse(body: str) -> dict:
    """{(sample name, frozenset(labels)): value}, and the families under key None."""
    out: dict = {None: {}}
    for fam in text_string_to_metric_families(body):
        out[None][fam.name] = fam
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


def wait_value(path: str, name: str, want: float, timeout: float = 30, **labels) -> dict:
    end = time.monotonic() + timeout
    while True:
        m = scrape_unix(path)
        if value(m, name, **labels) == want:
            return m
        assert time.monotonic() < end, f"{name}{labels} stayed {value(m, name, **labels)}"
        time.sleep(0.02)


def test_metrics_on_a_unix_socket_follow_sessions_memory_and_refusals(tmp_path):
    msock = str(tmp_path / "metrics.sock")
    d = start_daemon(tmp_path, config=f'[daemon]\nmetrics = "unix:{msock}"\nmax_sessions = 1\n')
    try:
        m = wait_value(msock, "tensord_sessions", 0)
        # names per Prometheus conventions: a tensord_ prefix, counters *_total, durations
        # in seconds, every family documented
        fams = m[None]
        for name, fam in fams.items():
            assert name.startswith("tensord_"), name
            assert fam.documentation, name
            if fam.type == "counter":
                assert any(s.name.endswith("_total") for s in fam.samples) or not fam.samples
            if "duration" in name:
                assert name.endswith("_seconds") and fam.type == "histogram", name
        for name in ("tensord_requests", "tensord_request_duration_seconds",
                     "tensord_queue_duration_seconds", "tensord_compute_duration_seconds",
                     "tensord_batch_size", "tensord_sessions", "tensord_shared_memory_bytes",
                     "tensord_pending_connections", "tensord_rejected_clients"):
            assert name in fams, sorted(fams)
        ring = 65536
        with Client(d.path, request_ring=ring, response_ring=ring) as c:
            m = wait_value(msock, "tensord_sessions", 1)
            assert value(m, "tensord_shared_memory_bytes") == 4096 + 2 * ring
            with pytest.raises(ResourceError):
                Client(d.path, request_ring=ring, response_ring=ring)
            wait_value(msock, "tensord_rejected_clients_total", 1, reason="sessions")
            c.ping()
        s = socket.socket(socket.AF_UNIX)
        s.connect(d.path)
        s.sendall(encode_frame(Hello(99, 99, "future", 0, 0)))
        assert isinstance(read_frame(s), Error)
        s.close()
        wait_value(msock, "tensord_rejected_clients_total", 1, reason="version")
        wait_value(msock, "tensord_sessions", 0)
        wait_value(msock, "tensord_shared_memory_bytes", 0)
        # anything but GET /metrics is refused, and the listener goes on
        s = socket.socket(socket.AF_UNIX)
        s.connect(msock)
        assert http_get(s, "/admin")[0] == "HTTP/1.1 404 Not Found"
        scrape_unix(msock)
    finally:
        assert d.stop() == 0, d.logs()


def test_metrics_on_loopback_tcp(tmp_path):
    d = start_daemon(tmp_path, config='[daemon]\nmetrics = "127.0.0.1:0"\n')
    try:
        end = time.monotonic() + 30
        while not (found := re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics",
                                      d.logs())):
            assert time.monotonic() < end, d.logs()
            time.sleep(0.02)
        port = int(found.group(1))
        s = socket.create_connection(("127.0.0.1", port))
        status, body = http_get(s)
        assert status == "HTTP/1.1 200 OK"
        assert value(parse(body), "tensord_build_info", version=metrics.__version__) == 1
    finally:
        assert d.stop() == 0, d.logs()


def test_metrics_are_off_by_default_and_a_bad_address_is_a_config_error(tmp_path):
    assert not metrics.enabled()
    metrics.rejected("x")  # a no-op while off
    assert "tensord_requests_total{" not in metrics.render().decode()
    d = start_daemon(tmp_path)
    assert "metrics on" not in d.logs()
    assert d.stop() == 0
    with pytest.raises(RuntimeError, match="is not HOST:PORT or unix:PATH"):
        start_daemon(tmp_path, config='[daemon]\nmetrics = "localhost"\n')


def test_request_metrics_count_requests_by_model_and_outcome(tmp_path):
    msock = str(tmp_path / "metrics.sock")
    d = start_daemon(tmp_path, config=f'[daemon]\nmetrics = "unix:{msock}"\n')
    try:
        with Client(d.path) as c:
            for _ in range(3):
                c.infer("mlp", {"x": torch.ones(2, 16)})
            with pytest.raises(Exception, match="dtype"):
                c.infer("mlp", {"x": torch.ones(2, 16, dtype=torch.float64)})
        # recorded as the response is written: a scrape right after may just precede it
        m = wait_value(msock, "tensord_requests_total", 3, timeout=5, model="mlp",
                       outcome="ok")
        assert value(m, "tensord_requests_total", model="mlp", outcome="BAD_INPUT") == 1
        assert value(m, "tensord_request_duration_seconds_count", model="mlp") == 4
        assert value(m, "tensord_compute_duration_seconds_count", model="mlp") >= 1
        assert value(m, "tensord_batch_size_count", model="mlp") >= 1
    finally:
        assert d.stop() == 0, d.logs()

