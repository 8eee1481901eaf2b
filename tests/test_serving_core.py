"""The native serving core (issue 16): Python is entered once per batch, never per request;
64 sessions from 8 processes get every row of every answer right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from conftest import start_daemon

from tensord.client import Client

HERE = Path(__file__).resolve().parent


def _snapshot(d: Path, n: int) -> dict[str, int]:
    (d / "dump").touch()
    end = time.monotonic() + 30
    while not (d / f"counts-{n}.json").exists():
        assert time.monotonic() < end, "the profiled daemon wrote no counts"
        time.sleep(0.02)
    return json.loads((d / f"counts-{n}.json").read_text())


def _by_thread(delta: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k, v in delta.items():
        thread = k.split(":", 1)[0]
        out[thread] = out.get(thread, 0) + v
    return out


def test_python_runs_once_per_batch_never_per_request(tmp_path, monkeypatch):
    prof = tmp_path / "prof"
    prof.mkdir()
    monkeypatch.setenv("TENSORD_TEST_PROFILE", str(prof))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(HERE / "profile_site"), os.environ.get("PYTHONPATH", "")]))
    d = start_daemon(tmp_path)
    try:
        clients = [Client(d.path) for _ in range(8)]
        clients[0].infer("mlp", {"x": torch.zeros(1, 16)})  # the worker has started
        before = _snapshot(prof, 0)
        for i in range(400):  # identity: answered by the core, no Python at all
            x = torch.full((64,), float(i))
            assert torch.equal(clients[i % 8].infer("identity", {"x": x})["y"], x)
        after_identity = _snapshot(prof, 1)
        delta = {k: v - before.get(k, 0) for k, v in after_identity.items()
                 if v != before.get(k, 0)}
        assert sum(delta.values()) < 40, f"Python ran for identity requests: {delta}"

        def flood(c: Client, k: int) -> None:
            for r in range(150):
                x = torch.full((1, 16), float(k * 1000 + r))
                c.infer("mlp", {"x": x})

        stats0 = {m.name: m for m in clients[0].stats()}["mlp"]
        after_identity = _snapshot(prof, 2)  # the control loop answered stats: not counted
        threads = [threading.Thread(target=flood, args=(c, k)) for k, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after_mlp = _snapshot(prof, 3)
        stats1 = {m.name: m for m in clients[0].stats()}["mlp"]
        batches = stats1.batches - stats0.batches
        requests = stats1.served - stats0.served
        assert requests == 8 * 150
        delta = {k: v - after_identity.get(k, 0) for k, v in after_mlp.items()
                 if v != after_identity.get(k, 0)}
        # Exactly one pass of the worker's batch function per batch, whatever its size.
        assert delta.get("model-mlp-0:_tensors", 0) == batches, (batches, delta)
        per_batch = _by_thread(delta).get("model-mlp-0", 0) / batches
        print(f"mlp: {requests} requests in {batches} batches; {per_batch:.0f} Python calls "
              "per batch in its worker")
        # Nothing else in the daemon runs Python for these requests.
        others = {t: n for t, n in _by_thread(delta).items()
                  if not t.startswith("model-mlp") and n > 40}
        assert others == {}, others
        for c in clients:
            c.close()
    finally:
        assert d.stop() == 0, d.logs()


def test_64_sessions_from_8_processes_get_their_own_rows(tmp_path, go_probe):
    """Every row of every answer is the caller's own: one-row requests with distinct payloads
    from 64 sessions (8 processes x 8 goroutines, each its own session) to a batched model."""
    import textwrap

    script = tmp_path / "make_echo.py"
    script.write_text(textwrap.dedent(f"""
        import warnings
        import torch
        warnings.simplefilter("ignore", FutureWarning)
        class Echo(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x * 2 + 1
        torch.jit.script(Echo()).save({str(tmp_path / 'echo.pt')!r})
    """))
    subprocess.run([sys.executable, str(script)], check=True)
    d = start_daemon(tmp_path, config=f"""
[daemon]
max_sessions = 128
max_sessions_per_uid = 0

[[models]]
name = "echo"
source = "torchscript"
path = "{tmp_path / 'echo.pt'}"
inputs = [{{name = "x", dtype = "i64", shape = [-1, 2]}}]
outputs = [{{name = "y", dtype = "i64", shape = [-1, 2]}}]
max_batch_size = 64
max_queue_delay_us = 500
""")
    try:
        procs = [subprocess.Popen([go_probe, "-socket", d.path, "-mode", "echo", "-own-sessions",
                                   "-scale", "2", "-offset", "1", "-model", "echo",
                                   "-goroutines", "8",
                                   "-n", "300", "-id", str(p), "-timeout", "300s"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for p in range(8)]
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0 and out.strip() == "ok 2400", out + err
        with Client(d.path) as c:
            st = {m.name: m for m in c.stats()}["echo"]
        assert st.served == 8 * 8 * 300
        assert max(size for size, _ in st.batch_sizes) > 1, st.batch_sizes
    finally:
        assert d.stop() == 0, d.logs()


def test_one_instance_means_one_forward_pass_at_a_time(tmp_path):
    """Issue 15 defect 8: a model with instances = 1 never runs two passes at once, whatever
    the load (only its one worker runs it; the core never runs a model itself)."""
    d = start_daemon(tmp_path, config=f"""
[[models]]
name = "overlap"
source = "handler"
handler = "handlers_for_tests:Overlap"
warmup = false
instances = 1
options = {{dir = "{tmp_path}"}}
""")
    try:
        def call(k: int) -> None:
            with Client(d.path) as c:
                for r in range(60):
                    x = torch.tensor([float(k * 100 + r)])
                    assert c.infer("overlap", {"x": x})["y"].tolist() == [2 * (k * 100 + r)]

        threads = [threading.Thread(target=call, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert (tmp_path / "max").read_text() == "1"
    finally:
        assert d.stop() == 0, d.logs()


def test_a_full_queue_overloads_whoever_holds_the_most_of_it(tmp_path):
    """Issue 19 item 6: one session filling a model's queue must not make another session's
    request OVERLOADED: the newcomer takes the place of the flood's newest request."""
    from handlers_for_tests import gate_calls, wait_for
    from pipelining import publish, responses

    from tensord.contract.errors import OverloadedError

    d = start_daemon(tmp_path, config=f"""
[[models]]
name = "gate"
source = "handler"
handler = "handlers_for_tests:Gate"
warmup = false
max_queue = 4
options = {{dir = "{tmp_path}"}}
""")
    try:
        with Client(d.path) as a, Client(d.path) as flood, Client(d.path) as light:
            held = threading.Thread(target=a.infer, args=("gate", {"x": torch.tensor([0.0])}),
                                    kwargs={"timeout": 60})
            held.start()
            wait_for(tmp_path / "started")
            for i in range(4):
                publish(flood, "gate", 100 + i, torch.tensor([100.0 + i]), "f32")
            end = time.monotonic() + 30
            while {m.name: m for m in a.stats()}["gate"].queued != 4:
                assert time.monotonic() < end
                time.sleep(0.01)
            out: dict = {}
            t = threading.Thread(target=lambda: out.update(
                light.infer("gate", {"x": torch.tensor([7.0])}, timeout=60)))
            t.start()
            got = responses(flood, {103})  # the flood's newest makes room, at once
            assert isinstance(got[103], OverloadedError), got[103]
            (tmp_path / "open").touch()
            held.join()
            t.join()
            assert out["y"].tolist() == [7.0]
            rest = responses(flood, {100, 101, 102})
            assert [float(rest[100 + i]["y"][0]) for i in range(3)] == [100.0, 101.0, 102.0]
            assert sorted(v for call in gate_calls(tmp_path)[1:] for v in call) == \
                [7.0, 100.0, 101.0, 102.0]
    finally:
        (tmp_path / "open").touch()
        assert d.stop() == 0, d.logs()
