"""What tensord adds to a real model: EfficientNet-Lite0 on one photo, called in-process in
Python vs from Go through the daemon, p50 of both measured in one run on this machine.

    .venv/bin/python bench/model_overhead.py [-n 50] [--photo tests/data/chelsea.jpg]

Needs the examples extra (TENSORD_EXTRAS=test,examples bash daemon/setup.sh) and Go.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def in_process(photo: bytes, n: int) -> dict:
    from tensord.config import load_config
    from tensord.contract.dtypes import ByteStrings
    from tensord.models.loader import load_model

    # the example is a vision.classify config: load it as the daemon does, on the CPU
    (mc,) = [m for m in load_config(str(ROOT / "daemon/tensord/examples/models.toml")).models
             if m.name == "efficientnet"]
    mc.device = "cpu"
    model = load_model(mc)
    x = [ByteStrings([photo], (1,))]
    ts = []
    with torch.inference_mode():  # what a Python program calling the model itself would do
        for _ in range(5):
            model.forward(x)
        for _ in range(n):
            t0 = time.perf_counter()
            model.forward(x)
            ts.append(time.perf_counter() - t0)
    ts.sort()
    return {"p50_ms": round(ts[n // 2] * 1e3, 2), "p99_ms": round(ts[min(n - 1, n * 99 // 100)]
                                                               * 1e3, 2)}


def through_daemon(photo_path: str, n: int) -> dict:
    tmp = tempfile.mkdtemp()
    sock = os.path.join(tmp, "d.sock")
    probe = os.path.join(tmp, "shmprobe")
    subprocess.run(["go", "build", "-o", probe, "./cmd/shmprobe"], cwd=ROOT / "go", check=True)
    d = subprocess.Popen([sys.executable, "-m", "tensord", "serve", "--socket", sock,
                          "--config", str(ROOT / "daemon/tensord/examples/models.toml"),
                          "--log-level", "WARNING"])
    try:
        for _ in range(600):
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(sock)
                break
            except OSError:
                time.sleep(0.1)
        out = subprocess.run([probe, "-socket", sock, "-mode", "latency", "-model",
                              "efficientnet", "-input", "image", "-file", photo_path,
                              "-n", str(n), "-timeout", "600s"],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out)
        return {"p50_ms": round(r["p50_us"] / 1e3, 2), "p99_ms": round(r["p99_us"] / 1e3, 2)}
    finally:
        d.send_signal(signal.SIGTERM)
        d.wait()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, default=50)
    p.add_argument("--photo", default=str(ROOT / "tests/data/chelsea.jpg"))
    a = p.parse_args()
    photo = Path(a.photo).read_bytes()
    local = in_process(photo, a.n)
    remote = through_daemon(a.photo, a.n)
    print(json.dumps({"model": "efficientnet-lite0", "photo": os.path.basename(a.photo),
                      "threads": torch.get_num_threads(), "python_in_process": local,
                      "go_through_tensord": remote,
                      "added_p50_ms": round(remote["p50_ms"] - local["p50_ms"], 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
