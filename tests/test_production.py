"""What a service needs before production (issue 17): protocol 5's idempotent models and
error fields (with protocol 4 clients still served), one retry classification per error
code, and the Python client's reconnecting behaviour. Real daemons, real shared memory."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch
from conftest import start_daemon
from handlers_for_tests import gate_calls, wait_for

from tensord.client import Client, ReconnectingClient
from tensord.contract.errors import (
    BadInputError,
    ConnectionClosedError,
    ErrorCode,
    OverloadedError,
    TooLargeError,
    retryable,
    safe_to_retry,
)


def test_models_say_whether_they_are_idempotent(daemon):
    with Client(daemon.path) as c:
        assert c.welcome.version == 5
        info = {m.name: m for m in c.models()}
        assert info["mlp"].idempotent is True and info["identity"].idempotent is True


def test_errors_name_the_input_and_the_limit(daemon):
    with Client(daemon.path) as c:
        with pytest.raises(BadInputError) as e:
            c.infer("mlp", {"x": torch.ones(2, 15)})
        assert e.value.input == "x" and e.value.item is None and e.value.limit is None
    with pytest.raises(TooLargeError) as e:  # a control `error`, fatal at the handshake
        Client(daemon.path, request_ring=1 << 31)
    assert e.value.limit == 1 << 30 and e.value.input is None and "max_ring" in e.value.message


def test_protocol_4_client_gets_protocol_4_messages(daemon):
    """A v5 daemon speaks 4 too: no `idempotent`, no error fields (SPEC §2.4 hello)."""
    with Client(daemon.path, max_version=4) as c:
        assert c.welcome.version == 4
        assert all(m.idempotent is None for m in c.models())
        with pytest.raises(BadInputError) as e:
            c.infer("mlp", {"x": torch.ones(2, 15)})
        assert e.value.input is None
        assert torch.equal(c.infer("identity", {"x": torch.arange(3.0)})["y"], torch.arange(3.0))
    with pytest.raises(TooLargeError) as e:
        Client(daemon.path, request_ring=1 << 31, max_version=4)
    assert e.value.limit is None


def test_retry_classification_is_a_property_of_the_code(daemon):
    """Bad input found by the client and by the daemon: both certainly did not run and
    neither is worth retrying; transient codes are (SPEC §6 "Worth retrying")."""
    with Client(daemon.path, request_ring=65536) as c:
        with pytest.raises(TooLargeError) as client_found:  # refused before it is written
            c.infer("identity", {"x": torch.zeros(1 << 16)})
        with pytest.raises(BadInputError) as daemon_found:
            c.infer("mlp", {"x": torch.ones(2, 15)})
    for e in (client_found.value, daemon_found.value):
        assert safe_to_retry(e) and not retryable(e)
    assert retryable(OverloadedError("queue full"))
    assert not safe_to_retry(BadInputError("x", code=ErrorCode.MODEL_FAILED))


# -- restarts: a service started first, idempotent requests in flight at a SIGKILL ---------

GATES = """
[[models]]
name = "gate"
source = "handler"
handler = "handlers_for_tests:Gate"
warmup = false
idempotent = true
options = {{ dir = "{a}" }}

[[models]]
name = "gate_once"
source = "handler"
handler = "handlers_for_tests:Gate"
warmup = false
options = {{ dir = "{b}" }}
"""


def _in_thread(fn):
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test thread
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_service_started_before_the_daemon(tmp_path):
    path = str(tmp_path / "tensord.sock")
    fast = ReconnectingClient(path, fail_fast=True)
    t0 = time.monotonic()
    with pytest.raises(ConnectionClosedError) as e:
        fast.infer("identity", {"x": torch.arange(3.0)}, timeout=30)
    assert time.monotonic() - t0 < 5 and retryable(e.value) and not fast.connected
    waiting = ReconnectingClient(path, reconnect_wait=0.02, max_reconnect_wait=0.2)
    x = torch.arange(5.0) * 7
    t, box = _in_thread(lambda: waiting.infer("identity", {"x": x}, timeout=60))
    time.sleep(0.3)
    assert t.is_alive(), "the call waits for the daemon"
    d = start_daemon(tmp_path)
    try:
        t.join(60)
        assert "error" not in box, box.get("error")
        assert torch.equal(box["value"]["y"], x) and waiting.connected
        assert torch.equal(fast.infer("identity", {"x": x}, timeout=30)["y"], x)
    finally:
        waiting.close()
        fast.close()
        d.stop()


def test_idempotent_request_in_flight_at_sigkill_is_made_again(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    config = GATES.format(a=a, b=b)
    d = start_daemon(tmp_path, config=config)
    rc_a = ReconnectingClient(d.path, reconnect_wait=0.02, max_reconnect_wait=0.2)
    rc_b = ReconnectingClient(d.path, reconnect_wait=0.02, max_reconnect_wait=0.2)
    try:
        assert {m.name: m.idempotent for m in rc_a.models()}["gate"] is True
        ta, box_a = _in_thread(lambda: rc_a.infer("gate", {"x": torch.tensor([1.0, 2.0])},
                                                  timeout=90))
        tb, box_b = _in_thread(lambda: rc_b.infer("gate_once", {"x": torch.tensor([3.0])},
                                                  timeout=90))
        wait_for(a / "started")
        wait_for(b / "started")
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        for g in (a, b):  # the next daemon answers at once, and differently
            (g / "value").write_text("100")
            (g / "open").touch()
        d = start_daemon(tmp_path, config=config)
        ta.join(90)
        tb.join(90)
        assert "error" not in box_a, box_a.get("error")
        assert torch.equal(box_a["value"]["y"], torch.tensor([101.0, 102.0]))
        err = box_b.get("error")
        assert isinstance(err, ConnectionClosedError) and err.ran is None, box_b
        assert gate_calls(a) == [[1.0, 2.0], [1.0, 2.0]]  # once on each daemon
    finally:
        rc_a.close()
        rc_b.close()
        d.stop()
