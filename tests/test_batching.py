"""Dynamic batching, deadlines, priorities, admission and fairness (serving/scheduler.py),
against a real daemon. The gate model (handlers_for_tests.Gate) holds a forward pass until the
test opens it, so every test waits on observable state, never on timing."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import start_daemon
from handlers_for_tests import gate_calls, wait_for
from pipelining import publish, responses

from tensord.client import Client
from tensord.contract.errors import DeadlineError, OverloadedError

ECHO = """
import warnings

import torch

warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice

class Echo(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

torch.jit.script(Echo()).save({path!r})
"""


def config(tmp_path, gate: str = "", echo: str = "", daemon: str = "") -> str:
    return f"""
[daemon]
max_sessions = 128
{daemon}

[[models]]
name = "gate"
source = "handler"
handler = "handlers_for_tests:Gate"
warmup = false
options = {{dir = "{tmp_path}"}}
{gate}

[[models]]
name = "echo"
source = "torchscript"
path = "{tmp_path / 'echo.pt'}"
inputs = [{{name = "x", dtype = "i64", shape = [-1, 2]}}]
outputs = [{{name = "y", dtype = "i64", shape = [-1, 2]}}]
{echo}
"""


@pytest.fixture
def make_daemon(tmp_path):
    script = tmp_path / "make_echo.py"  # TorchScript reads the class's source from a file
    script.write_text(ECHO.format(path=str(tmp_path / "echo.pt")))
    subprocess.run([sys.executable, str(script)], check=True)
    started = []

    def make(**keys):
        d = start_daemon(tmp_path, config=config(tmp_path, **keys))
        d.gate = tmp_path
        started.append(d)
        return d

    yield make
    for d in started:
        (d.gate / "open").touch()
        assert d.stop() == 0, d.logs()


def stat(c: Client, name: str):
    return {m.name: m for m in c.stats()}[name]


def wait_queued(c: Client, name: str, n: int) -> None:
    end = time.monotonic() + 60
    while stat(c, name).queued != n:
        assert time.monotonic() < end, f"{name}: {stat(c, name)}"
        time.sleep(0.01)


def in_thread(fn, *args, **kw) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args, **kw)
        except Exception as e:  # recorded for the test's assertions
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_request_expired_in_the_queue_is_answered_deadline_and_never_computed(make_daemon):
    d = make_daemon()
    with Client(d.path) as a, Client(d.path) as b, Client(d.path) as watch:
        held, _ = in_thread(a.infer, "gate", {"x": torch.tensor([1.0])}, timeout=120)
        wait_for(d.gate / "started")
        late, out = in_thread(b.infer, "gate", {"x": torch.tensor([2.0])}, timeout=120,
                              budget=0.2)
        wait_queued(watch, "gate", 1)
        time.sleep(1.0)  # a lower bound: the 0.2 s budget is certainly gone
        (d.gate / "open").touch()
        held.join()
        late.join()
        assert isinstance(out.get("error"), DeadlineError), out
        assert "queue" in str(out["error"])
        assert gate_calls(d.gate) == [[1.0]], "the expired request never ran"
        st = stat(watch, "gate")
        assert (st.expired, st.served) == (1, 1)


def test_full_queue_answers_overloaded_at_once(make_daemon):
    d = make_daemon(gate="max_queue = 2")
    clients = [Client(d.path) for _ in range(4)]
    try:
        held, _ = in_thread(clients[0].infer, "gate", {"x": torch.tensor([0.0])}, timeout=120)
        wait_for(d.gate / "started")
        queued = [in_thread(c.infer, "gate", {"x": torch.tensor([float(i)])}, timeout=120)
                  for i, c in enumerate(clients[1:3], 1)]
        wait_queued(clients[3], "gate", 2)
        # The gate is still closed: this answer can only come from admission.
        with pytest.raises(OverloadedError, match="max_queue"):
            clients[3].infer("gate", {"x": torch.tensor([9.0])}, timeout=120)
        assert stat(clients[3], "gate").rejected == 1
        (d.gate / "open").touch()
        for t, out in [(held, {}), *queued]:
            t.join()
            assert "error" not in out, out
        assert sorted(v for call in gate_calls(d.gate) for v in call) == [0.0, 1.0, 2.0]
    finally:
        for c in clients:
            c.close()


def test_high_priority_goes_before_normal_requests_queued_earlier(make_daemon):
    d = make_daemon(daemon=f"priority_uids = [{os.getuid()}]")
    with Client(d.path) as a, Client(d.path) as b, Client(d.path) as h:
        held, _ = in_thread(a.infer, "gate", {"x": torch.tensor([0.0])}, timeout=120)
        wait_for(d.gate / "started")
        for i in range(3):
            publish(b, "gate", 100 + i, torch.tensor([float(i + 1)]), "f32", wait=0)
        wait_queued(h, "gate", 3)
        urgent, out = in_thread(h.infer, "gate", {"x": torch.tensor([9.0])}, timeout=120,
                                priority=1)
        wait_queued(h, "gate", 4)
        (d.gate / "open").touch()
        held.join()
        urgent.join()
        responses(b, {100, 101, 102})
        assert "error" not in out, out
        order = [call[0] for call in gate_calls(d.gate)]
        assert order == [0.0, 9.0, 1.0, 2.0, 3.0], order


def test_a_flooding_session_does_not_starve_a_light_one(make_daemon):
    d = make_daemon()
    with Client(d.path) as a, Client(d.path) as flood, Client(d.path) as light:
        held, _ = in_thread(a.infer, "gate", {"x": torch.tensor([0.0])}, timeout=120)
        wait_for(d.gate / "started")
        ids = set()
        for i in range(20):
            publish(flood, "gate", 1000 + i, torch.tensor([100.0 + i]), "f32", wait=0)
            ids.add(1000 + i)
        wait_queued(light, "gate", 20)
        t, out = in_thread(light.infer, "gate", {"x": torch.tensor([7.0])}, timeout=120)
        wait_queued(light, "gate", 21)
        (d.gate / "open").touch()
        held.join()
        t.join()
        responses(flood, ids)
        order = [call[0] for call in gate_calls(d.gate)]
        # Round-robin across sessions: the light request runs right after the flood's first.
        assert order.index(7.0) <= 2, order
        assert len(order) == 22


def test_batches_join_sessions_and_give_each_request_its_own_rows(make_daemon):
    d = make_daemon(echo="max_batch_size = 32\nmax_queue_delay_us = 2000")
    clients = [Client(d.path) for _ in range(8)]
    bad = []

    def run(i, c):
        for r in range(60):
            n = 1 + (i + r) % 3  # requests of 1-3 rows: the split must follow each one
            x = torch.tensor([[i, r * 10 + k] for k in range(n)], dtype=torch.int64)
            y = c.infer("echo", {"x": x}, timeout=60)["y"]
            if not torch.equal(x, y):
                bad.append((i, r, x.tolist(), y.tolist()))

    try:
        threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert bad == []
        st = stat(clients[0], "echo")
        assert st.served == 8 * 60
        assert max(size for size, _ in st.batch_sizes) > 1, st.batch_sizes
        assert sum(size * count for size, count in st.batch_sizes) == 8 * 60
        r = subprocess.run([sys.executable, "-m", "tensord", "stats", "--socket", d.path],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        row = next(line.split() for line in r.stdout.splitlines() if line.startswith("echo "))
        assert row[3] == str(8 * 60), r.stdout  # served
        assert "echo batch sizes" in r.stdout
    finally:
        for c in clients:
            c.close()


def test_8_go_processes_x_8_goroutines_x_500_requests_all_matched(make_daemon, go_probe):
    d = make_daemon(echo="max_batch_size = 64\nmax_queue_delay_us = 500")
    procs = [subprocess.Popen([go_probe, "-socket", d.path, "-mode", "echo", "-model", "echo",
                               "-goroutines", "8", "-n", "500", "-id", str(p),
                               "-timeout", "300s"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in range(8)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0 and out.strip() == "ok 4000", out + err
    with Client(d.path) as c:
        st = stat(c, "echo")
    assert st.served == 8 * 8 * 500
    assert max(size for size, _ in st.batch_sizes) > 1, st.batch_sizes
    print(f"echo: {st.batches} forward passes for {st.served} requests, "
          f"mean batch {st.served / st.batches:.1f}")


def test_a_client_that_never_reads_responses_does_not_hold_up_others(make_daemon):
    """Its response ring fills; its answers wait in the daemon (and then its requests wait in
    its own ring), while other sessions are served. When it reads, every answer arrives."""
    d = make_daemon()
    stalled = Client(d.path, request_ring=1 << 20, response_ring=65536)
    try:
        x = torch.ones(4000)  # 16 KB each: four responses fill the 64 KiB response ring
        ids = set()
        for i in range(40):
            publish(stalled, "identity", 500 + i, x, "f32", wait=0)
            ids.add(500 + i)
        with Client(d.path) as other:
            for i in range(50):
                y = other.infer("echo", {"x": torch.tensor([[i, i]])}, timeout=60)["y"]
                assert y.tolist() == [[i, i]]
        responses(stalled, ids)
    finally:
        stalled.close()


def test_health_goes_not_ready_while_a_forward_pass_is_stuck(make_daemon):
    d = make_daemon(daemon="stuck_after_s = 0.3")
    with Client(d.path) as a, Client(d.path) as watch:
        assert watch.health().ready
        held, _ = in_thread(a.infer, "gate", {"x": torch.tensor([1.0])}, timeout=120)
        wait_for(d.gate / "started")
        end = time.monotonic() + 60
        while watch.health().ready:  # the limit passes while the gate holds the pass
            assert time.monotonic() < end
            time.sleep(0.05)
        h = watch.health()
        assert not h.ready and "'gate'" in h.reason and not h.draining
        gate = {m.name: m for m in h.models}["gate"]
        assert not gate.ready and gate.running_ms >= 300
        r = subprocess.run([sys.executable, "-m", "tensord", "health", "--socket", d.path],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "not ready" in r.stdout, r.stdout + r.stderr
        (d.gate / "open").touch()
        held.join()
        end = time.monotonic() + 30  # the answer may arrive just before the pass is counted done
        while not watch.health().ready:
            assert time.monotonic() < end, watch.health()
            time.sleep(0.01)
        r = subprocess.run([sys.executable, "-m", "tensord", "health", "--socket", d.path],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "ready"
