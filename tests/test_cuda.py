"""The CUDA path: page-locked session memory, side streams, fp16 models. Needs a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import start_daemon

from tensord.client import Client
from tensord.serving.cuda import HostRegistration, SideStream
from tensord.transport import records
from tensord.transport.segment import Segment

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU; CI and this host have none")


def test_registered_segment_copies_both_ways_without_staging():
    seg = Segment.create("c" * 32, 1 << 20, 1 << 20)
    reg = HostRegistration(seg.address(), seg.header.segment_size)
    try:
        src = records.read_tensor(seg.buf, 4096, torch.float32, 4, 1 << 20, (1 << 18,))
        src.copy_(torch.arange(1 << 18, dtype=torch.float32))
        stream = SideStream(torch.device("cuda:0"))
        with stream.context():
            dev = src.to("cuda:0", non_blocking=True) * 2
            dst = records.read_tensor(seg.buf, 4096 + (1 << 20), torch.float32, 4, 1 << 20,
                                      (1 << 18,))
            dst.copy_(dev, non_blocking=True)
        stream.synchronize()
        assert torch.equal(dst, torch.arange(1 << 18, dtype=torch.float32) * 2)
        del src, dst
    finally:
        reg.release()
        assert seg.close()


def test_fp16_model_on_gpu_returns_declared_f32(tmp_path):
    from tensord.models.builtin import build_mlp

    path = str(tmp_path / "mlp.pt")
    build_mlp().save(path)
    d = start_daemon(tmp_path, config=f"""
[[models]]
name = "mlp_gpu"
source = "torchscript"
path = "{path}"
device = "cuda:0"
precision = "fp16"
inputs = [{{name = "x", dtype = "f32", shape = [-1, 16]}}]
outputs = [{{name = "y", dtype = "f32", shape = [-1, 4]}}]
""")
    try:
        with Client(d.path) as c:
            info = {m.name: m for m in c.models()}["mlp_gpu"]
            assert info.device == "cuda:0"
            x = torch.randn(64, 16)
            y = c.infer("mlp_gpu", {"x": x})["y"]
            assert y.dtype == torch.float32
            torch.testing.assert_close(y, build_mlp()(x), rtol=2e-2, atol=2e-2)
            for _ in range(200):  # many requests: every response is complete when signalled
                x = torch.randn(32, 16)
                torch.testing.assert_close(c.infer("mlp_gpu", {"x": x})["y"], build_mlp()(x),
                                           rtol=2e-2, atol=2e-2)
    finally:
        assert d.stop() == 0

