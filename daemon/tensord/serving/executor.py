"""Runs models: one compute thread per device runs every forward pass on that device; loads and
warm-ups run on short-lived threads.

Why one thread per device: PyTorch's CPU parallelism is OpenMP, and libgomp keeps a worker pool
per thread that runs parallel regions. With pools in several long-lived threads there are more
OpenMP threads than cores, libgomp stops spinning between regions, and each region pays a futex
wake-up: EfficientNet-Lite0 measured 2x slower (43 ms vs 22 ms p50) when run from a second
thread while the first thread's pool was alive. The CPU's compute thread keeps the one
long-lived pool; a GPU's thread only queues kernels, so a slow CPU model never holds up a GPU
model and the other way round. Models that do no tensor math (identity) run inline in the
dispatcher, saving the hand-off. The thread that finishes a request also writes its response:
nothing is handed back.
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

from ..contract.dtypes import ByteStrings
from ..contract.errors import DeadlineError, ModelFailedError, ShuttingDownError, TensordError
from ..models.base import Model
from ..models.signature import Value

log = logging.getLogger(__name__)


class Cancelled(ShuttingDownError):
    """The job's session ended while it waited for the compute thread."""


class _Job:
    __slots__ = ("fn", "args", "done", "result", "error")

    def __init__(self, fn: Callable, args: tuple, wait: bool = True):
        self.fn = fn
        self.args = args
        self.done = threading.Event() if wait else None
        self.result: Any = None
        self.error: BaseException | None = None


class ComputeThread:
    def __init__(self, name: str = "compute") -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args: Any) -> None:
        """Queue fn(*args) on the compute thread; its result is dropped, so fn reports its own
        outcome (a request job writes its response)."""
        self._jobs.put(_Job(fn, args, wait=False))

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
                if job.done is None:
                    log.exception("a compute job failed")
            finally:
                if job.done is not None:
                    job.done.set()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()


class Executor:
    def __init__(self) -> None:
        self._threads: dict[str, ComputeThread] = {}
        self._lock = threading.Lock()

    def thread_for(self, device: str) -> ComputeThread:
        """The compute thread of a device ("cpu", "cuda:0"), started on first use."""
        t = self._threads.get(device)
        if t is None:
            with self._lock:
                t = self._threads.get(device)
                if t is None:
                    t = self._threads[device] = ComputeThread(f"compute-{device}")
        return t

    def submit(self, model: Model, fn: Callable, *args: Any) -> None:
        """Run fn(*args) where `model` runs: inline for models without tensor math, else
        queued on its device's compute thread. fn writes its own response."""
        if model.inline:
            fn(*args)
        else:
            self.thread_for(model.device).submit(fn, *args)

    def stop(self) -> None:
        with self._lock:
            threads, self._threads = list(self._threads.values()), {}
        for t in threads:
            t.stop()

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
