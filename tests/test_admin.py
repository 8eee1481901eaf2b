"""Runtime model control: load, reload (atomic, failure keeps the old one), unload, admin check."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
from conftest import start_daemon
from handlers_for_tests import gate_config, wait_for

from tensord.client import Client
from tensord.contract.errors import (
    BadRequestError,
    ModelFailedError,
    PermissionDeniedError,
    UnknownModelError,
    UnsupportedError,
)

MAKE = """
import torch
class Add(torch.nn.Module):
    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        y = x
        for _ in range(int(n.item())):
            y = torch.tanh(y @ torch.eye(256)) * 0 + y
        return y + {add}
torch.jit.script(Add()).save({path!r})
"""

SIGNATURE = {
    "inputs": [{"name": "x", "dtype": "f32", "shape": [-1, 256]},
               {"name": "n", "dtype": "i64", "shape": []}],
    "outputs": [{"name": "y", "dtype": "f32", "shape": [-1, 256]}],
}


def make_model(tmp_path, add: float, name: str = "add.pt") -> str:
    path = str(tmp_path / name)
    script = tmp_path / f"make_{int(add)}.py"
    script.write_text(MAKE.format(add=add, path=path))
    subprocess.run([sys.executable, str(script)], check=True)
    return path


def call(c: Client, n: int = 0) -> float:
    y = c.infer("add", {"x": torch.zeros(1, 256), "n": torch.tensor(n)})["y"]
    return float(y[0, 0])


def version(c: Client, name: str) -> int:
    return {m.name: m.version for m in c.models()}[name]


def test_load_reload_unload(daemon, tmp_path):
    path = make_model(tmp_path, 1.0)
    with Client(daemon.path) as c:
        c.load("add", {"source": "torchscript", "path": path, "device": "cpu", **SIGNATURE})
        assert call(c) == 1.0 and version(c, "add") == 1
        with pytest.raises(BadRequestError, match="already loaded"):
            c.load("add", {"source": "torchscript", "path": path, **SIGNATURE})

        make_model(tmp_path, 2.0)
        c.reload("add")
        assert call(c) == 2.0 and version(c, "add") == 2

        (tmp_path / "add.pt").write_bytes(b"not a model")
        with pytest.raises(ModelFailedError, match="previous version keeps serving"):
            c.reload("add")
        assert call(c) == 2.0 and version(c, "add") == 2

        c.unload("add")
        with pytest.raises(UnknownModelError):
            call(c)
        with pytest.raises(UnknownModelError):
            c.unload("add")

        make_model(tmp_path, 3.0)
        c.load("add", {"source": "torchscript", "path": path, "device": "cpu", **SIGNATURE})
        assert call(c) == 3.0
        assert version(c, "add") == 3, "a version number is never handed out twice"
        c.unload("add")


def test_bad_loads_change_nothing(daemon, tmp_path):
    with Client(daemon.path) as c:
        before = [m.name for m in c.models()]
        with pytest.raises(BadRequestError, match="unknown keys"):
            c.load("m", {"source": "torchscript", "path": "x.pt", "colour": "red"})
        with pytest.raises(BadRequestError, match="unknown source"):
            c.load("m", {"source": "onnx", "path": "x.pt"})
        with pytest.raises(ModelFailedError, match="failed to load"):
            c.load("m", {"source": "torchscript", "path": str(tmp_path / "missing.pt"),
                         **SIGNATURE})
        with pytest.raises(ModelFailedError, match="cannot import handler"):
            c.load("m", {"source": "handler", "handler": "no.such.module:Cls", **SIGNATURE})
        with pytest.raises(UnsupportedError, match="built in"):
            c.reload("mlp")
        assert [m.name for m in c.models()] == before


def test_outputs_breaking_the_signature_fail_the_load(daemon, tmp_path):
    path = make_model(tmp_path, 1.0)
    sig = {**SIGNATURE, "outputs": [{"name": "y", "dtype": "f32", "shape": [-1, 10]}]}
    with Client(daemon.path) as c:
        with pytest.raises(ModelFailedError, match="does not match its signature"):
            c.load("wrong", {"source": "torchscript", "path": path, **sig})
        sig = {**SIGNATURE, "outputs": [{"name": "y", "dtype": "i64", "shape": [-1, 256]}]}
        with pytest.raises(ModelFailedError, match="dtype f32, the model takes i64"):
            c.load("wrong", {"source": "torchscript", "path": path, **sig})
        # without warm-up the same mismatch is caught on the request instead
        c.load("wrong", {"source": "torchscript", "path": path, "warmup": False, **sig})
        with pytest.raises(ModelFailedError, match="does not match its signature"):
            c.infer("wrong", {"x": torch.zeros(1, 256), "n": torch.tensor(0)})
        c.unload("wrong")


def test_in_flight_request_finishes_on_the_version_it_started(daemon, tmp_path):
    (tmp_path / "value").write_text("1")
    with Client(daemon.path) as admin, Client(daemon.path) as user:
        admin.load("gate", gate_config(tmp_path))
        result = {}
        t = threading.Thread(target=lambda: result.setdefault(
            "y", user.infer("gate", {"x": torch.zeros(1)}, timeout=120)["y"]))
        t.start()
        wait_for(tmp_path / "started")  # version 1 is computing the request now
        (tmp_path / "value").write_text("2")
        admin.reload("gate")
        assert version(admin, "gate") == 2
        assert t.is_alive(), "the request is held at the gate while the reload lands"
        (tmp_path / "open").touch()
        t.join()
        assert float(result["y"][0]) == 1.0, "the request that started on version 1 ends on it"
        assert float(user.infer("gate", {"x": torch.zeros(1)})["y"][0]) == 2.0
        admin.unload("gate")


def test_non_admin_is_refused(tmp_path):
    d = start_daemon(tmp_path, config="[daemon]\nadmin_uids = [4242]\n")
    try:
        with Client(d.path) as c:
            with pytest.raises(PermissionDeniedError, match="admin_uids"):
                c.unload("mlp")
            assert "mlp" in [m.name for m in c.models()]
    finally:
        d.stop()


def test_cuda_device_without_a_gpu_is_a_clear_load_error(daemon, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU; the error is for hosts without one")
    path = make_model(tmp_path, 1.0)
    with Client(daemon.path) as c:
        with pytest.raises(ModelFailedError, match="CUDA is not available.*auto"):
            c.load("gpu", {"source": "torchscript", "path": path, "device": "cuda:0",
                           **SIGNATURE})
        c.load("auto", {"source": "torchscript", "path": path, "device": "auto", **SIGNATURE})
        assert {m.name: m.device for m in c.models()}["auto"] == "cpu"
        c.unload("auto")


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    make_model(tmp_path, 5.0, "rel.pt")
    d = start_daemon(tmp_path, config="[daemon]\n")  # tensord.toml in tmp_path
    try:
        with Client(d.path) as c:
            c.load("rel", {"source": "torchscript", "path": "rel.pt", **SIGNATURE})
            assert call_model(c, "rel") == 5.0
    finally:
        assert d.stop() == 0


def call_model(c: Client, name: str) -> float:
    y = c.infer(name, {"x": torch.zeros(1, 256), "n": torch.tensor(0)})["y"]
    return float(y[0, 0])
