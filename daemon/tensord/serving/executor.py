"""Runs models: one forward pass in the calling thread (a model's worker in scheduler.py, or
the dispatcher for models without tensor math), and loads and warm-ups on short-lived threads.

Threads and OpenMP: PyTorch's CPU parallelism is OpenMP, and libgomp keeps a worker pool per
thread that runs parallel regions; with more pool threads than cores libgomp stops spinning
between regions and each region pays a futex wake-up (EfficientNet-Lite0 measured 2x slower with
a second thread's pool alive). So loads run on short-lived threads whose pools go with them, and
the intra-op thread count is set once for the process (`threads` in `[daemon]`, default: the
cores this process may use), see `set_cpu_threads`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..contract.dtypes import ByteStrings
from ..contract.errors import DeadlineError, ModelFailedError, ShuttingDownError, TensordError
from ..models.base import Model
from ..models.signature import Value
from ..ratelog import RateLimited

log = logging.getLogger(__name__)
# Failing requests are a client's doing: their log lines are rate-limited.
_failures = RateLimited(log)


class Cancelled(ShuttingDownError):
    """The job's session ended before it ran."""


class _Job:
    __slots__ = ("result", "error")

    def __init__(self) -> None:
        self.result: Any = None
        self.error: BaseException | None = None


def available_cpus() -> int:
    """Cores this process may run on (affinity and the cgroup's cpu.max quota)."""
    n = len(os.sched_getaffinity(0))
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def set_cpu_threads(threads: int) -> int:
    """PyTorch's intra-op threads for CPU models. 0: half the cores this process may use (at
    least one): the daemon shares the host with its clients, and OpenMP threads that outnumber
    the cores they get fight each other and their neighbours (EfficientNet measured 10-35x
    slower with 2 threads on 2 busy cores than with 1)."""
    n = threads if threads > 0 else max(1, available_cpus() // 2)
    torch.set_num_threads(n)
    return n


class Executor:
    @staticmethod
    def aside(fn: Callable, *args: Any) -> Any:
        """Run fn(*args) (a model load and warm-up) on a short-lived thread of its own and
        return its result. Not on the compute thread, so a load that takes seconds does not
        stall serving; not on the caller's long-lived thread, whose OpenMP pool would stay
        (libgomp frees a thread's pool when the thread exits)."""
        job = _Job()

        def work() -> None:
            try:
                job.result = fn(*args)
            except BaseException as e:  # handed to the caller, raised in its thread
                job.error = e

        t = threading.Thread(target=work, name="load")
        t.start()
        t.join()
        if job.error is not None:
            raise job.error
        return job.result

    @staticmethod
    def run(model: Model, inputs: Sequence[Value], stream: Any = None,
            deadline: float | None = None,
            cancelled: Callable[[], bool] | None = None) -> tuple[list[Value], list[str]]:
        """One forward pass, in the calling thread (a compute thread, or the dispatcher for
        inline models). Returns the outputs (contiguous, still on the model's device: the
        session copies them straight into its response ring) and their wire dtypes. `stream`
        (a CUDA stream) is made current for the forward pass, so H2D copies and compute queue
        on it. `deadline` (time.monotonic) and `cancelled` are checked first, so work queued
        behind a long job is dropped if its caller is gone or out of time."""
        if cancelled is not None and cancelled():
            raise Cancelled(f"the session ended before model {model.name!r} ran")
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineError(f"the request's time budget ran out before model "
                                f"{model.name!r} could run (other work was queued ahead of "
                                "it); give it a longer deadline")
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        # workers run in inference mode already: entering it again costs, per batch
        mode = contextlib.nullcontext() if torch.is_inference_mode_enabled() else \
            torch.inference_mode()
        with mode, ctx:
            try:
                outputs = model.forward(inputs)
            except TensordError:
                raise
            except Exception as e:  # a model may raise anything; the caller gets it as an error
                # The caller gets words of its own; the exception (Python's names, paths,
                # values) goes to the log, under a reference both carry.
                ref = secrets.token_hex(4)
                _failures.info("model %s raised %s: %s (ref %s)", model.name, type(e).__name__,
                               e, ref)
                raise ModelFailedError(
                    f"model {model.name!r} failed on this request: an error inside the model "
                    f"(the daemon logged it as ref {ref})"
                ) from None
            if isinstance(outputs, (torch.Tensor, ByteStrings)):
                outputs = [outputs]
            outputs = list(outputs)
            dtypes = model.signature.check_outputs(model.name, outputs)
            return [_contiguous(o) for o in outputs], dtypes


def _contiguous(v: Value) -> Value:
    return v.detach().contiguous() if isinstance(v, torch.Tensor) else v
