"""Compute memory (issue 19.1): what a forward pass costs the daemon, per byte of its inputs,
and the budget passes draw on, so that no request can get the daemon OOM-killed.

A model's `memory_factor` is the bytes of daemon memory one byte of a request's inputs takes
while it runs: its gathered copy (the batch arena), the activations, and the outputs until the
core has copied them out. It is the config's `memory_factor`, or measured at warm-up: one
forward pass over a calibration batch, with the process's peak RSS reset before it (Linux
/proc/self/clear_refs), so the growth of the peak is what the pass allocated. Cost grows
with rows, so the factor holds for any batch size. Models whose inputs have no fixed row
form assume FALLBACK_FACTOR, except the built-in image and text handlers, which bound each
item instead (pixels, tokens; serving/core.py).

Two checks follow from it:
- at intake (the native core): a request whose inputs times the factor exceed
  max_compute_memory is TOO_LARGE; batches never join past that bound either;
- before each forward pass (the worker): a pass that needs more than the memory the daemon
  has now (host and cgroup, less what other passes hold) is not run: it is split, and a
  request that does not fit alone gets RESOURCE (it did not run; worth retrying later).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from ..contract.dtypes import DTYPES
from ..transport.segment import available_memory

log = logging.getLogger(__name__)

MiB = 1 << 20
# When the factor cannot be measured (no warm-up, no /proc/self/clear_refs, a model whose
# inputs have no fixed row form): a guess on the safe side for small networks; a config's
# `memory_factor` replaces it.
FALLBACK_FACTOR = 16.0
# The calibration batch's input bytes: large enough that the pass's buffers are fresh
# mappings (so the peak RSS sees them), small enough to cost well under a second.
CALIBRATION_BYTES = 4 * MiB
CALIBRATION_SECONDS = 2.0
# Passes estimated below this run without reading the memory the daemon has: the read
# costs ~50 µs, and the margin below covers them.
CHECK_FROM = 4 * MiB
# Kept free beyond a pass's estimate: the daemon's own growth meanwhile (sessions' copies,
# other threads' small allocations).
MARGIN = 64 * MiB


def _trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def _row_bytes(model) -> int:
    """Input bytes of one row for a model whose every input has a row dimension and a fixed
    row form; 0 when it has not."""
    if not all(s.shape and s.shape[0] == -1 and min(s.shape[1:], default=0) >= 0
               for s in model.signature.inputs):
        return 0
    return smallest_request(model)


def smallest_request(model) -> int:
    """Input bytes of the smallest request the model takes (one row where it has rows); 0
    when its inputs have no fixed form."""
    total = 0
    for s in model.signature.inputs:
        if s.shape is None or s.dtype in ("any", "bytes"):
            return 0
        n = DTYPES[s.dtype].itemsize
        for d in s.shape:
            n *= 1 if d < 0 else d  # any size: one
        total += n
    return total


def _inputs(model, rows: int) -> list[torch.Tensor]:
    return [torch.zeros((rows, *s.shape[1:]), dtype=DTYPES[s.dtype].torch_dtype)
            for s in model.signature.inputs]


def _growth(model, inputs: list[torch.Tensor]) -> int:
    """Bytes the process's peak RSS grew by during one forward pass over `inputs`."""
    # Freed heap memory goes back to the kernel first: a pass that reused it would not raise
    # the peak (glibc keeps what earlier passes freed), and the factor would come out low.
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS starts again from the current RSS
    before = _status("VmRSS:")
    outputs = model.forward(inputs)
    grew = _status("VmHWM:") - before
    del outputs
    return max(0, grew)


def measure_factor(model) -> float | None:
    """The model's memory factor from calibration passes, or None when it cannot be measured
    here. A small pass first (about CALIBRATION_BYTES / 16 of input), then one of about
    CALIBRATION_BYTES when the small one says it fits in the memory the daemon has now and
    took under CALIBRATION_SECONDS (its factor then: fixed costs weigh less in it)."""
    row = _row_bytes(model)
    if row == 0:
        return None
    factor = 0.0
    try:
        with torch.inference_mode():
            for target in (CALIBRATION_BYTES // 16, CALIBRATION_BYTES):
                rows = max(1, target // row)
                if model.signature.max_batch:
                    rows = min(rows, model.signature.max_batch)
                nbytes = rows * row
                if factor and factor * nbytes + MARGIN > available_memory()[0]:
                    break
                inputs = _inputs(model, rows)
                started = time.monotonic()
                # + 1: the batch's gathered inputs (the arena), which exist before the pass
                factor = 1.0 + _growth(model, inputs) / nbytes
                if time.monotonic() - started > CALIBRATION_SECONDS / 16:
                    break
    except OSError as e:
        log.info("model %s: cannot measure its memory per input byte (%s)", model.name, e)
        return None
    except Exception as e:  # the model's own code: it ran one row at warm-up, not these
        log.warning("model %s: its calibration pass failed (%s: %s); assuming %.0f bytes of "
                    "daemon memory per input byte (set memory_factor in its config)",
                    model.name, type(e).__name__, e, FALLBACK_FACTOR)
        return None
    return factor


class ComputeBudget:
    """The memory forward passes may take, all models together: `limit` (max_compute_memory)
    bounds any one request at intake; `reserve` checks each large pass against what the daemon
    has now."""

    def __init__(self, limit: int, unallocated: Callable[[], int] = lambda: 0):
        self.limit = limit
        self._held = 0  # estimates of the passes running now (their memory may not exist yet)
        self._lock = threading.Lock()
        # Memory promised elsewhere whose pages do not exist yet (sessions admitted, segments
        # not allocated): the kernel does not count it, so reserve() must not hand it out.
        self.unallocated = unallocated

    @property
    def held(self) -> int:
        """Bytes reserved by the passes running now (session admission leaves them alone)."""
        return self._held

    def bound(self, factor: float) -> int:
        """The most input bytes one request (or batch) of a model with this factor may have."""
        return max(1, int(self.limit / factor)) if self.limit and factor else 0

    def reserve(self, need: int) -> str | None:
        """Hold `need` bytes for a pass (release them with `release`), or say why it does
        not fit now."""
        if need < CHECK_FROM:
            return None
        with self._lock:
            free, why = available_memory()
            free -= self._held + self.unallocated()
            if need + MARGIN > free:
                return (f"it needs about {need // MiB} MiB of daemon memory to run (and "
                        f"{MARGIN // MiB} MiB to spare), and {max(0, free) // MiB} MiB are free "
                        f"now ({why}): retry later, or send fewer rows per request")
            self._held += need
        return None

    def release(self, need: int) -> None:
        if need >= CHECK_FROM:
            with self._lock:
                self._held -= need


def default_limit() -> int:
    """max_compute_memory when the config leaves it 0: half the memory the daemon has at
    start (the host's available memory, or its cgroup's headroom when that is less)."""
    return available_memory()[0] // 2
