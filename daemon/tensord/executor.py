"""Runs models: every forward pass, load and warm-up happens on one compute thread.

Why one thread: PyTorch's CPU parallelism is OpenMP, and libgomp keeps a worker pool per
thread that runs parallel regions. With a pool in every session thread there are more OpenMP
threads than cores, libgomp stops spinning between regions, and each region pays a futex
wake-up: EfficientNet-Lite0 measured 2x slower (43 ms vs 22 ms p50) when run from a second
thread while the first thread's pool was alive. One compute thread keeps one long-lived pool;
loads run on short-lived threads whose pools go with them. Models that do no tensor math
(identity) are run inline in the session thread instead, saving the hand-off.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .contract.dtypes import ByteStrings
from .contract.errors import DeadlineError, ModelFailedError, ShuttingDownError, TensordError
from .models.base import Model
from .models.signature import Value

log = logging.getLogger(__name__)


class Cancelled(ShuttingDownError):
    """The job's session ended while it waited for the compute thread."""


class _Job:
    __slots__ = ("fn", "args", "done", "result", "error")

    def __init__(self, fn: Callable, args: tuple):
        self.fn = fn
        self.args = args
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class ComputeThread:
    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="compute", daemon=True)
        self._thread.start()

    def call(self, fn: Callable, *args: Any) -> Any:
        """Run fn(*args) on the compute thread and return its result (or raise its error)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        job = _Job(fn, args)
        self._jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job.result = job.fn(*job.args)
            except BaseException as e:  # handed to the caller, raised in its thread
                job.error = e
            finally:
                job.done.set()


class Executor:
    def __init__(self) -> None:
        self.compute = ComputeThread()

    @staticmethod
    def aside(fn: Callable, *args: Any) -> Any:
        """Run fn(*args) (a model load and warm-up) on a short-lived thread of its own and
        return its result. Not on the compute thread, so a load that takes seconds does not
        stall serving; not on the caller's long-lived thread, whose OpenMP pool would stay
        (libgomp frees a thread's pool when the thread exits)."""
        job = _Job(fn, args)

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

    def run(self, model: Model, inputs: Sequence[Value], stream: Any = None,
            deadline: float | None = None,
            cancelled: Callable[[], bool] | None = None) -> tuple[list[Value], list[str]]:
        """Returns the outputs (contiguous, still on the model's device: the session copies them
        straight into its response ring) and their wire dtypes. `stream` (a CUDA stream) is
        made current for the forward pass, so H2D copies and compute queue on it. `deadline`
        (time.monotonic) and `cancelled` are checked when the job reaches the compute thread,
        so work queued behind a long job is dropped if its caller is gone or out of time."""
        if model.inline:
            return self._run(model, inputs, None, deadline, cancelled)
        return self.compute.call(self._run, model, inputs, stream, deadline, cancelled)

    @staticmethod
    def _run(model: Model, inputs: Sequence[Value], stream: Any, deadline: float | None,
             cancelled: Callable[[], bool] | None):
        if cancelled is not None and cancelled():
            raise Cancelled(f"the session ended before model {model.name!r} ran")
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineError(f"the request's time budget ran out before model "
                                f"{model.name!r} could run (other work was queued ahead of "
                                "it); give it a longer deadline")
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            try:
                outputs = model.forward(inputs)
            except TensordError:
                raise
            except Exception as e:  # a model may raise anything; the caller gets it as an error
                log.info("model %s raised %s: %s", model.name, type(e).__name__, e)
                raise ModelFailedError(
                    f"model {model.name!r} raised {type(e).__name__}: {e}"
                ) from None
            if isinstance(outputs, (torch.Tensor, ByteStrings)):
                outputs = [outputs]
            outputs = list(outputs)
            dtypes = model.signature.check_outputs(model.name, outputs)
            return [_contiguous(o) for o in outputs], dtypes


def _contiguous(v: Value) -> Value:
    return v.detach().contiguous() if isinstance(v, torch.Tensor) else v
