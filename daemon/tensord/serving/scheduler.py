"""Per-model queues and the batcher: requests from any session and any process wait in their
model's queue, and the model's worker threads join them into one forward pass.

A queue keeps one FIFO per session and priority; a batch takes the highest priority first and,
within it, one request per session in turn (round-robin), so a session that floods a model
cannot starve another session of it. High priority never starves normal: while both wait, at
least one request in every HIGH_RUN + 1 taken is a normal one (and only sessions of uids in
`priority_uids` get high priority at all: session.py). Requests whose non-batch dimensions or
dtypes differ are never mixed: a batch is formed around its oldest request. A request that
expires while queued is answered DEADLINE and never computed; a full queue answers OVERLOADED
at once.

Each model has `instances` worker threads (on a GPU each has its own CUDA stream), so a slow
model never holds up another. A worker gathers the inputs into one batch tensor with a single
copy, runs the forward pass, splits the outputs along dimension 0 and answers each request in
its own session's response ring. A batch whose forward pass fails is retried in halves, so
only the requests that fail on their own get the error (bounded: about 2·log2(n) extra passes
for each failing request), and a request that was part of a failed pass is never answered as
"not run".

At most `instances` threads run a model at once: the dispatcher runs a fast model itself only
after claiming the queue (claim_inline) under the same lock the workers take batches under.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from .. import metrics
from ..contract.dtypes import ByteStrings
from ..contract.errors import (
    DeadlineError,
    InternalError,
    ModelFailedError,
    OverloadedError,
    ResourceError,
    TensordError,
)
from ..contract.messages import ModelHealth, ModelStat
from ..models.base import BatchPolicy, Model
from ..models.registry import Registry
from ..models.signature import Value
from ..ratelog import RateLimited
from . import cuda
from .executor import Executor
from .session import Job

log = logging.getLogger(__name__)
_bugs = RateLimited(log)

PRIORITIES = 2  # 0 normal, 1 high (SPEC §4.4)
# While requests of both priorities wait, at most this many high-priority ones are taken in a
# row before a normal one: normal priority keeps at least a quarter of the model's service.
HIGH_RUN = 3
# Models whose forward pass averages less than this run in the dispatcher when idle.
INLINE_PASS_US = 60.0


@dataclass
class ModelStats:
    """Counters of one model (SPEC `model_stats`); read without a lock: a snapshot may be a
    request behind, never torn (each field is one int)."""

    served: int = 0  # requests answered with outputs
    failed: int = 0  # requests answered with an error by the model
    rejected: int = 0  # OVERLOADED at admission
    expired: int = 0  # DEADLINE while queued
    batches: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # requests per batch -> count
    queue_us: int = 0  # total time requests waited in the queue
    compute_us: int = 0  # total forward-pass time of all batches
    max_queue_us: int = 0
    retried: int = 0  # extra forward passes run to isolate the requests that failed a batch


def batch_key(inputs: list[Value]) -> tuple:
    """Requests can share a batch when every input has the same dtype and non-batch dims."""
    key = []
    for v in inputs:
        if isinstance(v, ByteStrings):
            key.append(("bytes", tuple(v.shape[1:])))
        else:
            key.append((v.dtype, tuple(v.shape[1:]), v.dim()))
    return tuple(key)


def rows(job: Job) -> int:
    """Rows a request contributes to a batch (its first input's dimension 0)."""
    v = job.inputs[0]
    return v.shape[0] if len(v.shape) else 1


class ModelQueue:
    def __init__(self, model: Model, policy: BatchPolicy, registry: Registry,
                 executor: Executor, on_empty):
        self.model = model
        self.policy = policy
        self.registry = registry
        self.executor = executor
        self.stats = ModelStats()
        self._on_empty = on_empty
        self._cv = threading.Condition()
        # per priority: session -> deque of jobs; OrderedDict order is the round-robin order
        self._queues: list[OrderedDict] = [OrderedDict() for _ in range(PRIORITIES)]
        self.length = 0
        self._batching = policy.max_batch_size > 1 and _batchable(model)
        self._high_run = 0  # high-priority requests taken in a row while normal ones waited
        self._busy = 0  # workers running a batch, under _cv
        self._inline = False  # the dispatcher runs this model itself (claim_inline), under _cv
        self._stats_lock = threading.Lock()  # workers of one model update its stats together
        self._workers = [threading.Thread(target=self._work, args=(i,), daemon=True,
                                          name=f"model-{model.name}-{i}")
                         for i in range(max(1, policy.instances))]
        self._retired = False
        self.running_since: dict[int, float] = {}  # worker -> start of its forward pass
        self.pass_us: float | None = None  # moving average of one forward pass
        for w in self._workers:
            w.start()

    # -- admission (dispatcher thread) -----------------------------------------------------

    def put(self, job: Job) -> None:
        with self._cv:
            if self.length >= self.policy.max_queue:
                with self._stats_lock:
                    self.stats.rejected += 1
                full = True
            else:
                full = False
                job.queued_at = time.monotonic()
                job.key = batch_key(job.inputs)
                q = self._queues[job.priority]
                fifo = q.get(job.session)
                if fifo is None:
                    fifo = q[job.session] = deque()
                fifo.append(job)
                self.length += 1
                self._cv.notify()
        if full:
            job.session.finish(job.record, error=OverloadedError(
                f"model {self.model.name!r} has {self.policy.max_queue} requests queued "
                "(max_queue in its config): retry later, or add instances"))

    # -- batch formation (worker threads) --------------------------------------------------

    def _take(self, index: int) -> list[Job]:
        """Block for the next batch: [] once the model is retired and drained. The worker
        counts as running from here, under the lock claim_inline checks."""
        with self._cv:
            while self.length == 0 or self._inline:
                if self._retired and self.length == 0:
                    return []
                self._cv.wait()
            batch = self._form()
            if self._batching and len(batch) < self.policy.max_batch_size and \
                    self.policy.max_queue_delay_us > 0:
                # Wait for more, at most the delay counted from the oldest request.
                end = batch[0].queued_at + self.policy.max_queue_delay_us / 1e6
                while len(batch) < self.policy.max_batch_size:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    if self.length == 0:
                        self._cv.wait(left)
                    more = self._form(batch)
                    if not more and self.length:
                        break  # what waits cannot join this batch
                    batch += more
            if self.policy.preferred_batch_sizes and self._batching:
                batch = self._prefer(batch)
            if self.length:
                self._cv.notify()  # another worker may start the next batch
            self._busy += 1
            self.running_since[index] = time.monotonic()
            return batch

    def _form(self, batch: list[Job] | None = None) -> list[Job]:
        """Take requests for a batch (under the lock), all compatible with the batch's first
        request: high priority first (but see HIGH_RUN), one per session in turn."""
        taken: list[Job] = []
        batch = batch or []
        limit = self.policy.max_batch_size if self._batching else 1
        max_bytes = self.policy.max_batch_bytes
        nbytes = sum(_nbytes(j) for j in batch)
        key = batch[0].key if batch else None
        while len(batch) + len(taken) < limit:
            room = max_bytes - nbytes if max_bytes and (batch or taken) else None
            job = self._next(key, room)
            if job is None:
                break
            key = job.key
            nbytes += _nbytes(job)
            taken.append(job)
        return taken

    def _next(self, key: tuple | None, room: int | None) -> Job | None:
        """The next request to join a batch of `key` with `room` bytes left (None: any)."""
        high, normal = self._queues[1], self._queues[0]
        order = (normal, high) if high and normal and self._high_run >= HIGH_RUN \
            else (high, normal)
        for q in order:
            for session, fifo in q.items():
                job = fifo[0]
                if key is not None and job.key != key:
                    continue
                if room is not None and _nbytes(job) > room:
                    continue  # it waits for the next batch (a batch always takes one)
                fifo.popleft()
                if fifo:
                    q.move_to_end(session)
                else:
                    del q[session]
                self.length -= 1
                if q is high:
                    self._high_run = self._high_run + 1 if normal else 0
                else:
                    self._high_run = 0
                return job
        return None

    def _prefer(self, batch: list[Job]) -> list[Job]:
        """Trim to the largest preferred size that fits; the rest goes back in front."""
        sizes = [s for s in self.policy.preferred_batch_sizes if s <= len(batch)]
        if not sizes or max(sizes) == len(batch):
            return batch
        keep, back = batch[:max(sizes)], batch[max(sizes):]
        for job in reversed(back):
            q = self._queues[job.priority]
            fifo = q.get(job.session)
            if fifo is None:
                fifo = q[job.session] = deque()
                q.move_to_end(job.session, last=False)
            fifo.appendleft(job)
            self.length += 1
        return keep

    def claim_inline(self) -> bool:
        """Whether the dispatcher may run this model itself, and if so claim it (release with
        run_inline): a CPU model whose passes take a few microseconds, with nothing queued or
        running and no batching delay. A hand-off to the worker thread would cost more than
        the pass (it measured ~20 µs here). Under the lock workers take batches under, so the
        dispatcher and a worker never run one model at once."""
        with self._cv:
            ok = (self.pass_us is not None and self.pass_us < INLINE_PASS_US
                  and self.length == 0 and self._busy == 0 and not self._inline
                  and not self._retired and self.policy.max_queue_delay_us == 0
                  and not self.model.device.startswith("cuda"))
            if ok:
                self._inline = True
                self.running_since[-1] = time.monotonic()
            return ok

    def run_inline(self, jobs: list[Job]) -> None:
        """Run jobs a dispatcher pass took, in the dispatcher: batched as the worker would
        (compatible requests together, at most max_batch_size), never waiting for more."""
        groups: dict[tuple, list[Job]] = {}
        limit = self.policy.max_batch_size if self._batching else 1
        try:
            for job in jobs:
                job.queued_at = time.monotonic()
                job.key = batch_key(job.inputs)
                groups.setdefault(job.key if limit > 1 else (id(job),), []).append(job)
            for group in groups.values():
                for i in range(0, len(group), limit):
                    self._run_guarded(group[i:i + limit], None)
        finally:
            with self._cv:
                self._inline = False
                self.running_since.pop(-1, None)
                if self.length:
                    self._cv.notify()

    def stats_snapshot(self) -> ModelStats:
        with self._stats_lock:
            return ModelStats(**{**self.stats.__dict__,
                                 "batch_sizes": dict(self.stats.batch_sizes)})

    def cancel_queued(self, err: TensordError) -> int:
        """Answer every queued request with err (it never runs); returns how many."""
        with self._cv:
            jobs = [j for q in self._queues for fifo in q.values() for j in fifo]
            for q in self._queues:
                q.clear()
            self.length = 0
        for job in jobs:
            _fail(job, err)
        return len(jobs)

    def retire(self) -> None:
        """The model left the registry: workers finish what is queued, then exit."""
        with self._cv:
            self._retired = True
            self._cv.notify_all()

    # -- running a batch --------------------------------------------------------------------

    def _work(self, index: int) -> None:
        stream = None
        if self.model.device.startswith("cuda"):
            stream = cuda.SideStream(torch.device(self.model.device))
        with torch.inference_mode():
            while True:
                batch = self._take(index)
                if not batch:
                    break
                try:
                    self._run_guarded(batch, stream)
                finally:
                    with self._cv:
                        self._busy -= 1
                        self.running_since.pop(index, None)
        if index == 0:
            self._on_empty(self)

    def _run_guarded(self, batch: list[Job], stream) -> None:
        """_run, where a daemon bug costs this batch (its unanswered requests get INTERNAL),
        never the thread running it (a worker, or the dispatcher)."""
        try:
            self._run(batch, stream)
        except Exception as e:
            _bugs.exception("model %s: batch failed", self.model.name)
            err = InternalError(f"the batch failed inside the daemon: {type(e).__name__}: {e}")
            for job in batch:
                if not job.done:
                    _fail(job, err)

    def running_for(self, now: float) -> float:
        """Seconds the oldest forward pass running now has run (0 when none)."""
        with self._cv:
            started = min(self.running_since.values(), default=None)
        return now - started if started is not None else 0.0

    def _run(self, batch: list[Job], stream, retry: bool = False) -> None:
        """Run one batch and answer each request. `retry`: these requests were part of a
        failed pass, so they have run (no DEADLINE, which would say they had not)."""
        now = time.monotonic()
        live = []
        for job in batch:
            waited = now - job.queued_at
            if not retry:
                with self._stats_lock:
                    self.stats.queue_us += int(waited * 1e6)
                    self.stats.max_queue_us = max(self.stats.max_queue_us, int(waited * 1e6))
            if job.session.stopped:
                job.inputs, job.done = [], True
                job.session.finish(job.record)  # nobody to answer; frees the session
            elif not retry and job.deadline is not None and now > job.deadline:
                with self._stats_lock:
                    self.stats.expired += 1
                _fail(job, DeadlineError(
                    f"the request's time budget ran out after {waited * 1e3:.1f} ms in model "
                    f"{self.model.name!r}'s queue, before it ran; give it a longer deadline or "
                    "add instances"))
            else:
                live.append(job)
        if not live:
            return
        model = self.model
        live_batch = len(live)
        with self._stats_lock:
            self.stats.batches += 1
            self.stats.batch_sizes[live_batch] = self.stats.batch_sizes.get(live_batch, 0) + 1
            if retry:
                self.stats.retried += 1
        t0 = time.monotonic()
        try:
            inputs = live[0].inputs if len(live) == 1 else gather(model, live)
            outputs, dtypes = self.executor.run(model, inputs, stream.stream if stream else None)
            parts = [outputs] if len(live) == 1 else split(model, outputs, [rows(j) for j in live])
        except TensordError as e:
            took = time.monotonic() - t0
            with self._stats_lock:
                self.stats.compute_us += int(took * 1e6)
            if len(live) > 1:
                # Whatever failed the batch may be one request's doing (a bad index, a value
                # the model rejects): run each half again, so only the requests that fail on
                # their own get the error. Bounded: ~2·log2(n) passes per failing request.
                metrics.record_retry(model.name)
                mid = len(live) // 2
                self._run(live[:mid], stream, retry=True)
                self._run(live[mid:], stream, retry=True)
                return
            with self._stats_lock:
                self.stats.failed += 1
            _fail(live[0], e)
            return
        took = time.monotonic() - t0
        with self._stats_lock:
            self.stats.compute_us += int(took * 1e6)
        metrics.record_batch(model.name, live_batch, took)
        self.pass_us = took * 1e6 if self.pass_us is None else 0.8 * self.pass_us + 0.2 * took * 1e6
        sync = None
        if stream is not None:
            stream.synchronize()  # outputs a model moved to the CPU itself are complete
            sync = stream.synchronize
        names = [s.name for s in model.signature.outputs]
        for job, outs in zip(live, parts):
            try:
                if stream is not None:
                    with stream.context():  # D2H copies queue on this worker's stream
                        job.session.answer(job, names, outs, dtypes, sync)
                else:
                    job.session.answer(job, names, outs, dtypes, None)
                job.done = True
                with self._stats_lock:
                    self.stats.served += 1
                done = time.monotonic()
                metrics.record_request(model.name, "ok", queue_s=t0 - job.queued_at,
                                       total_s=done - job.read_at)
            except TensordError as e:
                _fail(job, e)


def _fail(job: Job, err: TensordError) -> None:
    job.inputs, job.done = [], True  # drop views of the request record before it is released
    job.session.finish(job.record, error=err)
    metrics.record_request(job.model.name, err.code.name,
                           total_s=time.monotonic() - job.read_at if job.read_at else None)


def _nbytes(job: Job) -> int:
    return sum(v.encoded_size() if isinstance(v, ByteStrings) else v.numel() * v.element_size()
               for v in job.inputs)


def _batchable(model: Model) -> bool:
    """Only models whose every input and output has a batch dimension (-1 first) batch."""
    specs = model.signature.inputs + model.signature.outputs
    return all(s.shape is not None and len(s.shape) >= 1 and s.shape[0] == -1 for s in specs)


def gather(model: Model, jobs: list[Job]) -> list[Value]:
    """One batch tensor per input, with a single copy (a handler may collate its own way)."""
    collate = getattr(getattr(model, "handler", None), "collate", None)
    per_request = [j.inputs for j in jobs]
    if collate is not None:
        return collate(per_request)
    device = torch.device(model.device)
    out: list[Value] = []
    for i in range(len(per_request[0])):
        parts = [inputs[i] for inputs in per_request]
        if isinstance(parts[0], ByteStrings):
            out.append(ByteStrings.concat(parts))
        elif device.type == "cuda":
            # Each request's rows go straight from the page-locked ring to the device
            # (async, on the worker's stream), where they are joined.
            out.append(torch.cat([p.to(device, non_blocking=True) for p in parts], dim=0))
        else:
            out.append(torch.cat(parts, dim=0))  # the one copy, out of the rings
    return out


def split(model: Model, outputs: list[Value], sizes: list[int]) -> list[list[Value]]:
    """Each request's rows of every output."""
    custom = getattr(getattr(model, "handler", None), "split", None)
    if custom is not None:
        return custom(outputs, sizes)
    total = sum(sizes)
    per: list[list[Value]] = [[] for _ in sizes]
    for o in outputs:
        n = (o.shape[0] if len(o.shape) else 0) if isinstance(o, ByteStrings) else \
            (o.shape[0] if o.dim() else 0)
        if n != total:
            raise ModelFailedError(
                f"model {model.name!r} returned {n} rows for a batch of {total}: a batched "
                "model must keep dimension 0 (set max_batch_size = 1 if it cannot)")
        if not isinstance(o, ByteStrings):
            # Views, one call: rows along dim 0 of a contiguous tensor are contiguous.
            for k, part in enumerate(torch.split(o, sizes)):
                per[k].append(part)
            continue
        start = 0
        for k, size in enumerate(sizes):
            per[k].append(o.rows(start, start + size))
            start += size
    return per


class Scheduler:
    """The model queues of the daemon, created on a model's first request."""

    def __init__(self, registry: Registry, executor: Executor):
        self.registry = registry
        self.executor = executor
        self._lock = threading.Lock()
        self._queues: dict[int, ModelQueue] = {}  # by id(model): a reload gets a new queue
        registry.watch(self.retire)

    def submit(self, job: Job) -> None:
        self.queue(job.model).put(job)

    def queue(self, model: Model) -> ModelQueue:
        q = self._queues.get(id(model))
        if q is None or q.model is not model:
            q = self._queue_for(model)
        return q

    def _queue_for(self, model: Model) -> ModelQueue:
        with self._lock:
            q = self._queues.get(id(model))
            if q is None or q.model is not model:
                # Queues of versions that left the registry drain and end.
                for old in list(self._queues.values()):
                    if old.model.name == model.name and old.model is not model:
                        old.retire()
                try:
                    q = ModelQueue(model, model.batching, self.registry, self.executor,
                                   self._gone)
                except RuntimeError as e:  # can't start new thread: at the task limit
                    raise ResourceError(
                        f"the daemon cannot start a worker thread for model {model.name!r} "
                        f"({e}): it is at its task limit (systemd TasksMax=, RLIMIT_NPROC)"
                    ) from None
                self._queues[id(model)] = q
            return q

    def _gone(self, q: ModelQueue) -> None:
        with self._lock:
            if self._queues.get(id(q.model)) is q:
                del self._queues[id(q.model)]

    def retire(self, name: str) -> None:
        """A model was unloaded or replaced."""
        with self._lock:
            for q in self._queues.values():
                if q.model.name == name and self.registry.peek(name) is not q.model:
                    q.retire()

    def queues(self) -> dict[str, ModelQueue]:
        """The current queue of each model name (its latest version)."""
        with self._lock:
            out: dict[str, ModelQueue] = {}
            for q in self._queues.values():
                if not q._retired:
                    out[q.model.name] = q
            return out

    def stats(self) -> list[ModelStat]:
        """Every served model's counters, sorted by name (zeros before its first request)."""
        current = self.queues()
        out = []
        for info in self.registry.infos():
            q = current.get(info.name)
            st = q.stats_snapshot() if q is not None and q.model.version == info.version \
                else ModelStats()
            out.append(ModelStat(
                name=info.name, version=info.version, queued=q.length if q else 0,
                served=st.served, failed=st.failed, rejected=st.rejected, expired=st.expired,
                batches=st.batches,
                batch_sizes=[[k, v] for k, v in sorted(dict(st.batch_sizes).items())],
                queue_us=st.queue_us, compute_us=st.compute_us, max_queue_us=st.max_queue_us))
        return out

    def health(self, stuck_after: float) -> list[ModelHealth]:
        """Per model: queue length and the age of its oldest running forward pass; a model
        whose pass has run longer than `stuck_after` seconds is not ready."""
        current = self.queues()
        now = time.monotonic()
        out = []
        for info in self.registry.infos():
            q = current.get(info.name)
            running = q.running_for(now) if q else 0.0
            out.append(ModelHealth(name=info.name, version=info.version,
                                   ready=running <= stuck_after, queued=q.length if q else 0,
                                   running_ms=int(running * 1e3)))
        return out

    def cancel_queued(self, err: TensordError) -> int:
        """Answer every request still queued, for every model, with err."""
        with self._lock:
            queues = list(self._queues.values())
        return sum(q.cancel_queued(err) for q in queues)

    def stop(self, timeout: float = 10.0) -> None:
        """Retire every queue and wait for running forward passes, at most `timeout` s in
        all (a stuck model must not keep the daemon from exiting)."""
        with self._lock:
            queues = list(self._queues.values())
        for q in queues:
            q.retire()
        end = time.monotonic() + timeout
        for q in queues:
            for w in q._workers:
                w.join(max(0.0, end - time.monotonic()))
                if w.is_alive():
                    log.warning("model %s: a forward pass is still running; exiting without "
                                "it", q.model.name)
