"""Compute memory (issue 19.1): no single request can get the daemon OOM-killed. A request
whose forward pass would need more memory than max_compute_memory allows is TOO_LARGE at
intake; one that needs more than the daemon has at the time (host or cgroup) is not run and
gets RESOURCE; batches are never joined past the bound."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from cgroups import daemon_in_memory_cgroup
from conftest import start_daemon
from pipelining import publish, responses

from tensord.client import ByteStrings, Client
from tensord.config import ConfigError, load_config
from tensord.contract.errors import ResourceError, TooLargeError, retryable, safe_to_retry
from tensord.models.builtin import build_mlp

MiB = 1 << 20
ROW = 16 * 4  # mlp: one row of x is 16 f32
# The built-in mlp again, from the config: the daemon measures a second copy after the first
# (a measurement that glibc's reuse of freed memory made read low: 2 instead of 9), and it
# would join requests into one batch whenever it could.
MLP = """
[[models]]
name = "mlp"
source = "builtin"
max_batch_size = 64
max_queue_delay_us = 200000
"""


def _factors(log: str) -> list[float]:
    return [float(m) for m in re.findall(r"model mlp: a forward pass takes ([0-9.]+) bytes", log)]


def _rows(n: int, seed: int) -> np.ndarray:
    """n distinct rows (each request's own numbers, so answers cannot be confused)."""
    return np.random.default_rng(seed).standard_normal((n, 16), dtype=np.float32)


def _check_mlp(x: np.ndarray, y: np.ndarray, sample: int = 4096) -> None:
    """y is mlp(x), on a sample of rows spread over the whole batch (first and last too)."""
    mlp = build_mlp()
    idx = np.unique(np.concatenate([np.arange(min(sample, len(x))),
                                    np.linspace(0, len(x) - 1, sample).astype(int)]))
    with torch.no_grad():  # not inference mode: other tests run the shared TorchScript with grad
        want = mlp(torch.from_numpy(x[idx])).numpy()
    assert y.shape == (len(x), 4)
    np.testing.assert_allclose(y[idx], want, rtol=1e-4, atol=1e-5)


def test_the_memory_factor_is_measured_at_warm_up_and_configurable(tmp_path):
    # In a process of its own: TorchScript's executor is shared by every instance of the
    # built-in mlp, and other tests run it with autograd on, which inference mode then trips on.
    out = subprocess.run([sys.executable, "-c", """
from tensord.models.builtin import builtin_models
from tensord.models.loader import warm_up
from tensord.models.memory import measure_factor
mlp, identity = (next(m for m in builtin_models() if m.name == n) for n in ("mlp", "identity"))
warm_up(mlp)
print(mlp.memory_factor, measure_factor(identity))
"""], capture_output=True, text=True, check=True).stdout.split()
    # 16 -> 64 -> 4: the hidden layer and its relu take 4 + 4 bytes per input byte, plus the
    # gathered input itself and the output (1/4)
    assert 8 <= float(out[0]) <= 12, out
    assert out[1] == "None"  # identity: no fixed row form, nothing to measure

    cfg = tmp_path / "c.toml"
    cfg.write_text('[[models]]\nname = "m"\nsource = "builtin"\nmemory_factor = 3\n')
    assert load_config(str(cfg)).models[0].memory_factor == 3.0
    cfg.write_text('[[models]]\nname = "m"\nsource = "builtin"\nmemory_factor = 0.5\n')
    with pytest.raises(ConfigError, match="memory_factor must be 0"):
        load_config(str(cfg))
    cfg.write_text("[daemon]\nmax_compute_memory = -1\n")
    with pytest.raises(ConfigError, match="max_compute_memory"):
        load_config(str(cfg))


def test_a_request_past_max_compute_memory_is_too_large_and_batches_stay_under_it(tmp_path):
    # mlp takes ~9 bytes per input byte: 64 MiB admits requests up to ~7 MiB of input
    d = start_daemon(tmp_path, config=f"[daemon]\nmax_compute_memory = {64 * MiB}\n{MLP}")
    try:
        with Client(d.path, request_ring=32 * MiB, response_ring=8 * MiB) as c:
            x = _rows(8 * MiB // ROW, 1)
            with pytest.raises(TooLargeError) as e:
                c.infer("mlp", {"x": x})
            msg = e.value.message
            assert "max_compute_memory" in msg and "send fewer rows" in msg, msg
            assert e.value.limit is not None and 6 * MiB < e.value.limit < 8 * MiB, e.value.limit
            assert not retryable(e.value)

            # 4 MiB requests fit alone, and they are never joined with each other (8 MiB)
            xs = {rid: _rows(4 * MiB // ROW, 100 + rid) for rid in range(1, 5)}
            for rid, xi in xs.items():
                publish(c, "mlp", rid, torch.from_numpy(xi), "f32")
            got = responses(c, set(xs))
            for rid, xi in xs.items():
                out = got[rid]
                assert isinstance(out, dict), out
                _check_mlp(xi, np.asarray(out["y"]))
            (stat,) = [s for s in c.stats() if s.name == "mlp"]
            assert stat.served == 4 and all(size == 1 for size, _ in stat.batch_sizes), stat
            assert "Traceback" not in d.logs(), d.logs()
            factors = _factors(d.logs())
            assert len(factors) == 2 and all(8 <= f <= 12 for f in factors), factors
    finally:
        assert d.stop() == 0, d.logs()


def test_no_single_request_gets_the_daemon_oom_killed_in_a_memory_cgroup(tmp_path):
    """The hostile run's case: sessions fill most of a memory cgroup, then ONE mlp request of
    786,432 rows (48 MiB of input; ~450 MiB to run) arrives. Before compute admission the
    kernel killed the daemon; now the request gets RESOURCE (it did not run), everyone else
    is still served, and once memory is free again the same request runs."""
    with daemon_in_memory_cgroup(tmp_path, MLP) as (d, cg):
        with Client(d.path) as probe:  # warm: the first session's costs are paid
            probe.ping()
        usage = int((cg / "memory.usage_in_bytes").read_text())
        (cg / "memory.limit_in_bytes").write_text(str(usage + 1024 * MiB))
        x = _rows(786_432, 7)
        with Client(d.path, request_ring=64 * MiB, response_ring=16 * MiB) as big, \
                Client(d.path, request_ring=65536, response_ring=65536) as small:
            fillers = [Client(d.path, request_ring=256 * MiB, response_ring=256 * MiB),
                       Client(d.path, request_ring=128 * MiB, response_ring=128 * MiB)]
            try:
                with pytest.raises(ResourceError) as e:
                    big.infer("mlp", {"x": x}, timeout=60)
                msg = e.value.message
                assert "did not run" in msg and "MiB are free now" in msg, msg
                assert "cgroup" in msg, msg
                assert safe_to_retry(e.value) and retryable(e.value)
                # everyone else is still served, the big client too
                xs = _rows(8, 8)
                _check_mlp(xs, np.asarray(small.infer("mlp", {"x": xs})["y"]))
                _check_mlp(xs, np.asarray(big.infer("mlp", {"x": xs})["y"]))
            finally:
                for f in fillers:
                    f.close()
            # the fillers' memory goes back (the core frees their segments) ...
            deadline = time.monotonic() + 10
            while int((cg / "memory.usage_in_bytes").read_text()) > usage + 400 * MiB:
                assert time.monotonic() < deadline, "the fillers' memory was not freed"
                time.sleep(0.05)
            # ... and the same request runs, with its own numbers
            _check_mlp(x, np.asarray(big.infer("mlp", {"x": x}, timeout=60)["y"]))
            xs = _rows(8, 9)
            _check_mlp(xs, np.asarray(small.infer("mlp", {"x": xs})["y"]))
        assert d.proc.poll() is None, "the daemon died:\n" + d.logs()
        oom = dict(line.split() for line in (cg / "memory.oom_control").read_text()
                   .splitlines())
        assert oom.get("oom_kill", "0") == "0", oom


def test_pass_reservations_and_admitted_sessions_see_each_other(monkeypatch):
    """Memory promised but not yet allocated counts on both sides: a forward pass's
    reservation against a session's handshake (connection.py adds `held` to what the
    segment check subtracts), and sessions admitted but not allocated against a pass.
    The memory the daemon has is a fake here (fixed at 1000 MiB)."""
    import tensord.models.memory as mem

    monkeypatch.setattr(mem, "available_memory", lambda: (1000 * MiB, "the host's memory"))
    admitted = [0]
    b = mem.ComputeBudget(4096 * MiB, lambda: admitted[0])
    assert b.reserve(600 * MiB) is None and b.held == 600 * MiB
    why = b.reserve(400 * MiB)  # 1000 - 600 held < 400 + the 64 MiB margin
    assert why is not None and "400 MiB" in why and "400 MiB are free now" in why, why
    b.release(600 * MiB)
    assert b.held == 0
    admitted[0] = 500 * MiB
    assert b.reserve(500 * MiB) is not None
    assert b.reserve(400 * MiB) is None
    b.release(400 * MiB)
    assert b.reserve(1 * MiB) is None and b.held == 0  # small passes reserve nothing


def test_a_model_no_request_of_which_fits_is_named_in_the_log(tmp_path):
    # one mlp row is 64 bytes of input, times ~9 to run: 256 bytes leave no room for one row
    d = start_daemon(tmp_path, config="[daemon]\nmax_compute_memory = 256\n")
    try:
        with Client(d.path) as c:
            with pytest.raises(TooLargeError, match="max_compute_memory"):
                c.infer("mlp", {"x": _rows(1, 3)})
        assert "model mlp: its smallest request (64 bytes of input) is past" in d.logs()
    finally:
        assert d.stop() == 0, d.logs()


def test_a_bytes_model_without_item_limits_is_bounded_too(tmp_path):
    """The per-request path (bytes inputs) of a handler that declares no per-item limits gets
    the assumed factor (16): with 16 MiB to compute in, a request takes at most 1 MiB."""
    d = start_daemon(tmp_path, config=f"""
[daemon]
max_compute_memory = {16 * MiB}
[[models]]
name = "lengths"
source = "handler"
handler = "handlers_for_tests:Lengths"
warmup = false
""")
    try:
        with Client(d.path, request_ring=8 * MiB) as c:
            texts = [bytes([65 + i % 26]) * (i % 50) for i in range(1000)]
            got = c.infer("lengths", {"x": ByteStrings(texts, (len(texts),))})["n"]
            np.testing.assert_array_equal(got, [len(t) for t in texts])
            big = [b"z" * 1000] * 2000  # 2 MB
            with pytest.raises(TooLargeError) as e:
                c.infer("lengths", {"x": ByteStrings(big, (len(big),))})
            assert "assumed: it could not be measured" in e.value.message, e.value.message
            assert e.value.limit == MiB, e.value.limit
    finally:
        assert d.stop() == 0, d.logs()
