"""The real daemon, driven by the Python reference client."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

import pytest
import torch
from conftest import ROOT

from tensord.client import Client
from tensord.contract.dtypes import ByteStrings
from tensord.models.builtin import build_mlp

SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 3, 4), (1, 1, 1, 1, 9)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.uint8, torch.bool]


def sample(dtype: torch.dtype, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash((str(dtype), shape)) & 0xFFFF)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 1000).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


@pytest.fixture(scope="module")
def client(daemon):
    with Client(daemon.path) as c:
        yield c


def test_models_metadata(client):
    models = {m.name: m for m in client.models()}
    assert set(models) >= {"identity", "mlp"}
    mlp = models["mlp"]
    assert (mlp.inputs[0].name, mlp.inputs[0].dtype, mlp.inputs[0].shape) == ("x", "f32",
                                                                               [-1, 16])
    assert (mlp.outputs[0].dtype, mlp.outputs[0].shape) == ("f32", [-1, 4])
    assert models["identity"].inputs[0].shape is None


def test_ping(client):
    client.ping()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_identity_round_trips_every_dtype_and_shape_bit_exact(client, dtype):
    for shape in SHAPES:
        x = sample(dtype, shape)
        y = client.infer("identity", {"x": x})["y"]
        assert y.dtype == dtype and tuple(y.shape) == shape
        assert torch.equal(y.view(-1).view(torch.uint8) if y.numel() else y,
                           x.view(-1).view(torch.uint8) if x.numel() else x)


def test_identity_several_mib(client):
    x = torch.randn(3, 1024, 1024)  # 12 MiB in a 16 MiB ring
    y = client.infer("identity", {"x": x})["y"]
    assert torch.equal(x, y)


def test_identity_bytes(client):
    s = ByteStrings([b"", b"hello", "żółw".encode(), bytes(range(256))], (2, 2))
    assert client.infer("identity", {"x": s})["y"] == s


def test_mlp_matches_the_model_run_in_process(client):
    x = torch.randn(5, 16)
    want = build_mlp()(x)
    got = client.infer("mlp", {"x": x})["y"]
    assert got.shape == (5, 4)
    torch.testing.assert_close(got, want)


def test_many_clients_at_once(daemon):
    errors = []

    def work(k: int) -> None:
        try:
            with Client(daemon.path) as c:
                for i in range(50):
                    x = torch.full((k + 1, i + 1), float(k * 1000 + i))
                    assert torch.equal(c.infer("identity", {"x": x})["y"], x)
        except Exception as e:  # collected and reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_ring_wraps_many_times(daemon):
    with Client(daemon.path, request_ring=65536, response_ring=65536) as c:
        for i in range(300):
            x = torch.arange(i * 37 % 5000, dtype=torch.int32)
            assert torch.equal(c.infer("identity", {"x": x})["y"], x)


def test_go_hello_built_without_cgo_runs_against_the_daemon(daemon, tmp_path):
    """The Go client is pure Go: the example builds with CGO_ENABLED=0 into a static binary
    (no ELF interpreter), and its mlp rows match PyTorch's within a tolerance."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("the Go toolchain is needed: the end-to-end tests run real Go binaries")
    exe = tmp_path / "hello"
    subprocess.run([go, "build", "-o", str(exe), "./examples/hello"], check=True,
                   cwd=ROOT / "go", env={**os.environ, "CGO_ENABLED": "0"})
    with open(exe, "rb") as f:
        head = f.read(1 << 16)
    assert b"ld-linux" not in head, "a CGO_ENABLED=0 binary needs no dynamic loader"
    r = subprocess.run([str(exe), "-socket", daemon.path], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "identity([1 2 3 4 5 6]) = y [2 3] [1 2 3 4 5 6]" in r.stdout, r.stdout
    rows = [line.split(":", 1)[1] for line in r.stdout.splitlines()
            if line.strip().startswith("row ")]
    got = torch.tensor([[float(v) for v in row.strip(" []").split()] for row in rows])
    x = torch.tensor([[(row + 1) * (col - 8) / 16 for col in range(16)] for row in range(3)])
    mlp = build_mlp()
    with torch.no_grad():
        want = mlp(x)
    # %v prints float32s to their shortest round-trip form, so only BLAS differences remain
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
