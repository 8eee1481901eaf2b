"""A model's worker: takes a batch from the native core, runs the model once, completes the
batch. Python runs here once per batch, never per request (the core reads the rings, checks
and queues requests, gathers their rows into one arena per input and writes every answer).

Two paths, chosen per model:
- tensors: each input of the batch is one tensor viewing its arena (no copy); the outputs go
  back to the core whole, and it splits them by rows. Every TorchScript, torch.export and
  module model, and handlers without their own collate/split, take it.
- per request: handlers with their own collate/split, and models with `bytes` inputs or
  outputs (the built-in vision/text handlers), get each request's inputs (byte strings in
  their wire form) and answer each request's outputs.

A batch whose forward pass fails is run again in halves, so only the requests that fail on
their own get the error (bounded: about 2·log2(n) more passes per failing request; each is
counted in the model's `retried` stat and tensord_batch_retries_total).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from itertools import accumulate
from typing import Any

import torch

from ..contract.dtypes import DTYPES, ByteStrings
from ..contract.errors import InternalError, ModelFailedError, ResourceError, TensordError
from ..contract.messages import error_fields
from ..models.base import Model
from ..models.memory import ComputeBudget
from ..models.signature import Value
from ..ratelog import RateLimited
from .executor import Executor

log = logging.getLogger(__name__)
_bugs = RateLimited(log)


def per_request(model: Model) -> bool:
    """Whether the model takes the per-request path (see the module's docstring)."""
    handler = getattr(model, "handler", None)
    if getattr(handler, "collate", None) is not None or getattr(handler, "split", None) is not None:
        return True
    specs = model.signature.inputs + model.signature.outputs
    return any(s.dtype in ("bytes", "any") for s in specs)


def work(queue: Any, model: Model, executor: Executor, stream: Any = None,
         on_exit: Callable[[], None] | None = None, compute: ComputeBudget | None = None,
         factor: float = 0.0) -> None:
    """A worker thread's loop: until the model is retired and its queue drained. `compute`
    and `factor`: each pass on the tensor path first reserves its memory (models/memory.py)."""
    split_here = per_request(model)
    budget = compute if compute is not None and factor else None
    with torch.inference_mode():
        while (batch := queue.next_batch()) is not None:
            try:
                if split_here:
                    _requests(batch, model, executor, stream, budget, factor)
                else:
                    _tensors(batch, model, executor, stream, budget, factor)
            except _Unwritable:
                _bugs.exception("model %s: outputs could not be written", model.name)
                for k in batch.open():
                    batch.fail(k, k + 1, int(InternalError.code),
                               "the outputs could not be written to the response ring (a "
                               "daemon fault, in its log); the model ran")
            except Exception:  # a daemon bug costs this batch, never the worker
                _bugs.exception("model %s: batch failed", model.name)
                for k in batch.open():
                    batch.fail(k, k + 1, int(InternalError.code),
                               "the batch failed inside the daemon (a daemon fault, in its "
                               "log); the model may have run")
            finally:
                batch.close()
                del batch  # its sessions and arenas go now, not at the next batch
    if on_exit is not None:
        on_exit()


def _torch_dtype(name: str) -> torch.dtype:
    dt = _TORCH[name]
    assert dt is not None
    return dt


_TORCH = {name: getattr(torch, {"f16": "float16", "bf16": "bfloat16", "f32": "float32",
                                "f64": "float64", "i8": "int8", "i16": "int16", "i32": "int32",
                                "i64": "int64", "u8": "uint8", "bool": "bool"}[name])
          for name in DTYPES if name != "bytes"}


def _view(arena: Any, dtype: str, offset: int, nbytes: int, shape: list[int]) -> torch.Tensor:
    """A tensor over arena bytes [offset, offset + nbytes) (no copy)."""
    dt = _torch_dtype(dtype)
    if nbytes == 0:
        return torch.empty(shape, dtype=dt)
    item = DTYPES[dtype].itemsize
    return torch.frombuffer(arena, dtype=dt, count=nbytes // item, offset=offset).view(shape)


def _attempt(batch: Any, lo: int, hi: int, run: Callable[[int, int], None]) -> None:
    """run(lo, hi) answers requests [lo, hi); when it fails, halves are tried, so only the
    requests that fail alone get the error."""
    try:
        run(lo, hi)
    except TensordError as e:
        if hi - lo > 1:
            batch.retried()
            mid = (lo + hi) // 2
            _attempt(batch, lo, mid, run)
            _attempt(batch, mid, hi, run)
        else:
            batch.fail(lo, hi, int(e.code), e.message, *error_fields(e))


def _tensors(batch: Any, model: Model, executor: Executor, stream: Any,
             budget: ComputeBudget | None = None, factor: float = 0.0) -> None:
    rows = batch.rows
    # Python, not numpy: for the few requests of a batch it is several times cheaper, and
    # this runs once per batch on the latency path
    starts = [0, *accumulate(rows)]
    sizes = [0] * len(rows)  # each request's input bytes
    whole = []
    for arena, dtype, spans in batch.inputs():
        if budget is not None:
            for k, (_, n, _) in enumerate(spans):
                sizes[k] += n
        if len(spans) == 1:
            o, n, shape = spans[0]
            whole.append(_view(arena, dtype, o, n, shape))
        else:
            total = sum(n for _, n, _ in spans)
            shape = [starts[-1], *spans[0][2][1:]]
            whole.append(_view(arena, dtype, 0, total, shape))
    cuda = model.device.startswith("cuda")
    names = [s.name for s in model.signature.outputs]
    single = len(rows) == 1

    def answer(lo: int, hi: int) -> None:
        inputs = whole if single or (lo, hi) == (0, len(rows)) else \
            [t[starts[lo]:starts[hi]] for t in whole]
        if cuda:  # after the reservation: staging is memory too
            inputs = [_pinned(i, t) for i, t in enumerate(inputs)]
        outputs, dtypes = executor.run(model, inputs, stream)
        if any(isinstance(o, ByteStrings) for o in outputs):
            _answer_each(batch, lo, _split(model, outputs, rows[lo:hi]), names, dtypes)
            return
        if single:
            # One request: its outputs as they are (any shape, a scalar too).
            batch.complete_one(lo, _wire(names, dtypes, outputs))
            return
        try:
            batch.complete(lo, hi, _wire(names, dtypes, outputs))
        except ValueError as e:  # the outputs do not have the requests' rows
            raise ModelFailedError(str(e)) from None

    _attempt(batch, 0, len(rows), _held(budget, factor, sizes, model, answer))


_staging = threading.local()
# Staging buffers kept from batch to batch are at most this large (page-locked memory is
# memory the kernel cannot reclaim).
STAGING_KEPT = 64 << 20


def _pinned(i: int, t: torch.Tensor) -> torch.Tensor:
    """`t` copied into this worker's page-locked staging buffer for input i (grown as needed,
    reused batch after batch), so the model's `.to(device, non_blocking=True)` is one
    asynchronous host-to-device copy per input per batch. The buffer is reused only after the
    batch's outputs came back to the host, which waits for the stream."""
    bufs = getattr(_staging, "bufs", None)
    if bufs is None:
        bufs = _staging.bufs = {}
    n = t.numel() * t.element_size()
    if n > STAGING_KEPT:  # an outsized batch gets a buffer of its own, freed with it
        return t.pin_memory()
    buf = bufs.get(i)
    if buf is None or buf.numel() < n:
        buf = bufs[i] = torch.empty(max(n, 1 << 20), dtype=torch.uint8, pin_memory=True)
    out = buf[:n].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def _held(budget: ComputeBudget | None, factor: float, sizes: list[int], model: Model,
          answer: Callable[[int, int], None]) -> Callable[[int, int], None]:
    """answer(lo, hi) (one pass over requests [lo, hi)), with the pass's compute memory
    (their input bytes `sizes` times `factor`) held until they are answered. When the daemon
    lacks it the pass does not run: RESOURCE, so halves are tried, and a request that does
    not fit alone gets it."""
    if budget is None:
        return answer

    def run(lo: int, hi: int) -> None:
        need = int(sum(sizes[lo:hi]) * factor)
        if (why := budget.reserve(need)) is not None:
            raise ResourceError(f"model {model.name!r} did not run the request: {why}")
        try:
            answer(lo, hi)
        finally:
            budget.release(need)

    return run


def _requests(batch: Any, model: Model, executor: Executor, stream: Any,
              budget: ComputeBudget | None = None, factor: float = 0.0) -> None:
    rows = batch.rows
    per: list[list[Value]] = [[] for _ in rows]
    sizes = [0] * len(rows)  # each request's input bytes
    for arena, dtype, spans in batch.inputs():
        mv = memoryview(arena)
        for k, (o, n, shape) in enumerate(spans):
            sizes[k] += n
            if dtype == "bytes":
                per[k].append(ByteStrings.from_encoded(bytes(mv[o:o + n]), tuple(shape)))
            else:
                per[k].append(_view(arena, dtype, o, n, shape))
    names = [s.name for s in model.signature.outputs]

    def answer(lo: int, hi: int) -> None:
        group = per[lo:hi]
        inputs = group[0] if len(group) == 1 else gather(model, group)
        outputs, dtypes = executor.run(model, inputs, stream)
        parts = [outputs] if len(group) == 1 else _split(model, outputs, rows[lo:hi])
        _answer_each(batch, lo, parts, names, dtypes)

    _attempt(batch, 0, len(rows), _held(budget, factor, sizes, model, answer))


def _answer_each(batch: Any, lo: int, parts: list[list[Value]], names: list[str],
                 dtypes: list[str]) -> None:
    wires = [_wire(names, dtypes, outs) for outs in parts]  # all checked before any answer
    for k, w in enumerate(wires):
        batch.complete_one(lo + k, w)


class _Unwritable(Exception):
    """The model ran but its outputs could not be handed to the core (a daemon fault)."""


def _wire(names: list[str], dtypes: list[str], outputs: list[Value]) -> list[tuple]:
    """(name, dtype, shape, buffer) per output, for the core to copy from."""
    try:
        return _wire_unchecked(names, dtypes, outputs)
    except TensordError:
        raise
    except Exception as e:
        raise _Unwritable() from e


def _wire_unchecked(names: list[str], dtypes: list[str], outputs: list[Value]) -> list[tuple]:
    out = []
    for name, dtype, v in zip(names, dtypes, outputs):
        if isinstance(v, ByteStrings):
            out.append((name, "bytes", list(v.shape), v.encode()))
            continue
        t = v.detach()
        if t.is_cuda:
            t = t.cpu()  # one device-to-host copy per output per batch
        t = t.contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        out.append((name, dtype, list(t.shape), data))
    return out


def gather(model: Model, per_request: list[list[Value]]) -> list[Value]:
    """One batch value per input from each request's (a handler may collate its own way)."""
    collate = getattr(getattr(model, "handler", None), "collate", None)
    if collate is not None:
        return collate(per_request)
    out: list[Value] = []
    for i in range(len(per_request[0])):
        parts = [inputs[i] for inputs in per_request]
        if isinstance(parts[0], ByteStrings):
            out.append(ByteStrings.concat(parts))
        else:
            out.append(torch.cat(parts, dim=0))
    return out


def _split(model: Model, outputs: list[Value], sizes: list[int]) -> list[list[Value]]:
    """Each request's rows of every output."""
    custom = getattr(getattr(model, "handler", None), "split", None)
    if custom is not None:
        return custom(outputs, sizes)
    total = sum(sizes)
    per: list[list[Value]] = [[] for _ in sizes]
    for o in outputs:
        n = o.shape[0] if len(o.shape) else 0
        if n != total:
            raise ModelFailedError(
                f"model {model.name!r} returned {n} rows for a batch of {total}: a batched "
                "model must keep dimension 0 (set max_batch_size = 1 if it cannot)")
        start = 0
        for k, size in enumerate(sizes):
            per[k].append(o.rows(start, start + size) if isinstance(o, ByteStrings)
                          else o[start:start + size])
            start += size
    return per


