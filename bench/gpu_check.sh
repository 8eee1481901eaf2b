#!/usr/bin/env bash
# The one-command CUDA check, for a host with a GPU (a few minutes): the CUDA tests (a real
# daemon serving fp16 and batched models from a GPU, the per-batch page-locked staging and
# device copies) and the H2D bandwidth from tensord memory against torch's own pinned copy.
# CI has no GPU: there the tests skip with the reason and this script says so and exits 0.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
TENSORD_EXTRAS=${TENSORD_EXTRAS:-test} bash daemon/setup.sh
py=.venv/bin/python
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check"
  exit 0
fi
"$py" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
.venv/bin/pytest -q -rs tests/test_cuda.py
"$py" bench/gpu_h2d.py --mib 64 --iters 50
