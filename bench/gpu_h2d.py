"""H2D bandwidth from a page-locked tensord session segment vs torch's own pinned tensor
(and pageable memory as the floor), measured in one run on one GPU.

    .venv/bin/python bench/gpu_h2d.py [--mib 64] [--iters 50]

Prints one JSON line per source. On a host without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tensord.serving.cuda import HostRegistration
from tensord.transport import records
from tensord.transport.segment import Segment


def bandwidth(src: torch.Tensor, dst: torch.Tensor, iters: int) -> float:
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        stream.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src, non_blocking=True)
        stream.synchronize()
    return src.numel() * iters / (time.perf_counter() - t0) / 1e9


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--iters", type=int, default=50)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device on this host"}))
        return 0
    n = a.mib << 20
    dst = torch.empty(n, dtype=torch.uint8, device="cuda:0")
    ring = 1 << max(16, (n - 1).bit_length())
    seg = Segment.create("bench-h2d", ring, 65536)  # a memfd: nothing to unlink
    t0 = time.perf_counter()
    reg = HostRegistration(seg.address(), seg.header.segment_size)
    register_ms = (time.perf_counter() - t0) * 1e3
    shm = records.read_tensor(seg.buf, seg.header.request_ring_offset, torch.uint8, 1, n, (n,))
    shm.fill_(7)
    pinned = torch.full((n,), 7, dtype=torch.uint8).pin_memory()
    pageable = torch.full((n,), 7, dtype=torch.uint8)
    rows = {
        "registered_shm": bandwidth(shm, dst, a.iters),
        "torch_pinned": bandwidth(pinned, dst, a.iters),
        "pageable": bandwidth(pageable, dst, a.iters),
    }
    for name, gbs in rows.items():
        print(json.dumps({"source": name, "mib": a.mib, "GB_per_s": round(gbs, 2),
                          "vs_torch_pinned": round(gbs / rows["torch_pinned"], 3)}))
    print(json.dumps({"cudaHostRegister_ms": round(register_ms, 2),
                      "device": torch.cuda.get_device_name(0)}))
    del shm
    reg.release()
    seg.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
