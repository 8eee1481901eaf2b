"""What a service needs before production (issue 17): protocol 5's idempotent models and
error fields (with protocol 4 clients still served), one retry classification per error
code, and the Python client's reconnecting behaviour. Real daemons, real shared memory."""

from __future__ import annotations

import io
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import builtin_fixtures
import pytest
import torch
from conftest import start_daemon
from handlers_for_tests import gate_calls, wait_for
from PIL import Image

from tensord.client import Client, ReconnectingClient
from tensord.config import model_config
from tensord.contract.dtypes import ByteStrings
from tensord.contract.errors import (
    BadInputError,
    ConnectionClosedError,
    ErrorCode,
    OverloadedError,
    TooLargeError,
    retryable,
    safe_to_retry,
)
from tensord.models.loader import load_model

DATA = Path(__file__).resolve().parent / "data"


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


# -- a request's cost is bounded by its size and the config; errors in the caller's terms ----

def _png_header(w: int, h: int) -> bytes:
    """A PNG that claims w x h 1-bit pixels and holds a few bytes of nonsense: what it costs
    to decode is what the header claims, so the daemon must refuse it from the header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + \
            struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x00" * 16) + \
        chunk(b"IEND", b"")


def _encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _load(files, table: dict):
    return load_model(model_config({"device": "cpu", "warmup": False, **table},
                                   str(files.dir), "test"))


def _run(model, *items: bytes):
    with torch.inference_mode():
        return model.forward([ByteStrings(list(items), (len(items),))])


builtin_files = builtin_fixtures.builtin_files


@pytest.fixture(scope="module")
def vision(builtin_files):
    return _load(builtin_files, {"name": "resnet", "source": "vision.classify",
                                 "path": str(builtin_files.resnet)})


def test_pixel_limits_are_sized_to_the_model_and_checked_from_the_header(vision):
    assert vision.limits.max_pixels == (16 * 256) ** 2  # resize 256; phone photos fit
    assert vision.handler.max_request_pixels == 4 * vision.limits.max_pixels
    # The 7.8 KB PNG of 8000x7999 pixels, and one past Pillow's own bomb limit: both
    # refused by max_pixels from their header. Their data is nonsense, so a decode would
    # have said "corrupt data" instead.
    for w, h in ((8000, 7999), (20000, 20000)):
        with pytest.raises(BadInputError) as e:
            _run(vision, _encode(Image.new("RGB", (8, 8))), _png_header(w, h))
        assert (e.value.input, e.value.item, e.value.limit) == ("image", 1, (16 * 256) ** 2)
        assert "limits.max_pixels" in e.value.message


def test_pixels_a_request_decodes_are_bounded(builtin_files):
    m = _load(builtin_files, {"name": "budget", "source": "vision.classify",
                              "path": str(builtin_files.resnet),
                              "options": {"max_request_pixels": 100_000}})
    small = _encode(Image.new("RGB", (200, 200), (9, 80, 200)))  # 40,000 pixels
    assert _run(m, small, small)[0].shape == (2, 5)
    # The third would take the request past 100,000 pixels: refused before it is decoded
    # (its data is nonsense; decoding it would have failed differently).
    with pytest.raises(BadInputError) as e:
        _run(m, small, small, _png_header(200, 200))
    assert (e.value.input, e.value.item, e.value.limit) == ("image", 2, 100_000)
    assert "max_request_pixels" in e.value.message


@pytest.mark.parametrize("data,words", [
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not a PNG/JPEG/WEBP image (48 bytes)"),
    (b"GIF89a? no", "not a PNG/JPEG/WEBP image"),
    ("chelsea.png", "not a decodable PNG/JPEG/WEBP image"),
    ("chelsea.jpg", "not a decodable JPEG image (truncated)"),
])
def test_undecodable_images_are_told_in_the_callers_terms(vision, data, words):
    if isinstance(data, str):
        data = (DATA / data).read_bytes()[:2000]
    with pytest.raises(BadInputError) as e:
        _run(vision, data)
    msg = e.value.message
    assert msg.startswith("input 'image' item 0: ") and words in msg, msg
    for internal in ("Error", "b'", "b\"", "PIL", "Traceback", "<"):
        assert internal not in msg, msg


@pytest.fixture(scope="module")
def sentiment(builtin_files):
    return _load(builtin_files, {"name": "s", "source": "text.classify",
                                 "path": str(builtin_files.bert),
                                 "tokenizer": str(builtin_files.tokenizer)})


class _SpyTokenizer:
    """Records what the handler hands its tokenizer."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def encode_batch(self, texts):
        self.lengths += [len(t) for t in texts]
        return self.tok.encode_batch(texts)


def test_long_texts_are_cut_before_tokenizing(sentiment):
    h = sentiment.handler
    spy = h.tokenizer = _SpyTokenizer(h.tokenizer)
    try:
        words = "the movie was great fun and the plot was good " * 20_000  # ~1 MB
        long = run_text(sentiment, words.encode())
        assert max(spy.lengths) == h.max_chars == 32 * h.max_tokens < 20_000
        # The model reads the same tokens as from the text cut by hand.
        cut = run_text(sentiment, words[:h.max_chars].encode())
        torch.testing.assert_close(long[1], cut[1])
    finally:
        h.tokenizer = spy.tok


def run_text(model, *texts: bytes):
    with torch.inference_mode():
        return model.forward([ByteStrings(list(texts), (len(texts),))])


# -- zero-downtime restart (control/takeover.py) -----------------------------------------------

def _upgrade(path: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tensord", "upgrade", "--socket", path, *args],
                          capture_output=True, text=True, timeout=120)


def test_upgrade_whose_successor_fails_changes_nothing(tmp_path):
    d = start_daemon(tmp_path, config="[daemon]\nbuiltin_models = true\n")
    try:
        (tmp_path / "tensord.toml").write_text("[daemon\nthis is not TOML")
        r = _upgrade(d.path)
        assert r.returncode == 1 and "exited before it was ready" in r.stderr, r
        assert "keeps serving" in d.logs()
        with Client(d.path) as c:  # the old daemon, still serving
            assert torch.equal(c.infer("identity", {"x": torch.arange(4.0)})["y"],
                               torch.arange(4.0))
        assert d.proc.poll() is None
    finally:
        d.stop()


def test_upgrade_hands_the_socket_over_and_the_old_daemon_drains(tmp_path):
    d = start_daemon(tmp_path)
    rc = ReconnectingClient(d.path, reconnect_wait=0.02, max_reconnect_wait=0.2)
    new_pid = None
    try:
        x = torch.arange(6.0)
        assert torch.equal(rc.infer("identity", {"x": x}, timeout=5)["y"], x)
        r = _upgrade(d.path)
        assert r.returncode == 0, r
        new_pid = int(re.search(r"new daemon \(pid (\d+)\)", r.stdout).group(1))
        assert d.proc.wait(timeout=30) == 0  # drained and stopped
        assert os.path.exists(d.path), "the old daemon left the socket file to the new one"
        assert torch.equal(rc.infer("identity", {"x": x * 2}, timeout=5)["y"], x * 2)
        # The next upgrade finds the new daemon by itself (it holds the listening socket).
        r = _upgrade(d.path)
        assert r.returncode == 0 and f"pid {new_pid} drains" in r.stdout, r
        newer = int(re.search(r"new daemon \(pid (\d+)\)", r.stdout).group(1))
        _wait_gone(new_pid)
        new_pid = newer
    finally:
        rc.close()
        d.stop()
        if new_pid:
            os.kill(new_pid, signal.SIGTERM)
            _wait_gone(new_pid)
    assert not os.path.exists(d.path), "the last daemon removes the socket file it took over"


def _wait_gone(pid: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < end, f"pid {pid} did not exit"
        time.sleep(0.05)
