"""The real daemon, driven by the Python reference client."""

from __future__ import annotations

import threading

import pytest
import torch

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
