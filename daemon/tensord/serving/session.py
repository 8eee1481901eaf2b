"""A client's session on the daemon side: the request records it reads, the jobs it makes of
them, and the responses it writes. It owns no thread: the dispatcher reads every session's
ring, and the thread that runs a request (a model's worker, or the dispatcher for inline
models) answers it in place."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from .. import metrics
from ..contract.descriptors import (
    MAX_DESCRIPTOR,
    ErrorInfo,
    ResponseDescriptor,
    TensorRef,
    align64,
    check_refs,
    decode_request,
    encode_descriptor,
)
from ..contract.dtypes import decode_byte_strings, lookup
from ..contract.errors import (
    BadInputError,
    BadRequestError,
    InternalError,
    TensordError,
    TooLargeError,
)
from ..contract.layout import KIND_PAD, KIND_RESPONSE, RECORD_HEADER_SIZE, ring_capacity
from ..contract.messages import error_fields
from ..models.base import Model
from ..models.registry import Registry
from ..models.signature import Value
from ..ratelog import RateLimited
from ..transport import records
from ..transport.ring import Record
from ..transport.segment import EFD_REQ_SPACE, EFD_RESP_DATA, EFD_RESP_SPACE, Segment
from ..transport.waiting import Notifier
from . import cuda
from .executor import Executor

log = logging.getLogger(__name__)

MAX_ERROR_MESSAGE = 4000
PLAN_CACHE = 256
# Responses parked while the client does not release response-ring space; past this many the
# dispatcher stops taking its requests (backpressure) instead of buffering without bound.
MAX_PARKED = 64
# Held by the dispatcher while it spins on rings without the GIL, and by a session while it
# unmaps its segment, so a spin never reads a mapping that is going away.
SPIN_GUARD = threading.Lock()


class Job:
    """One request, validated and ready to run: its inputs view the request record."""

    __slots__ = ("session", "record", "model", "inputs", "deadline", "priority", "queued_at",
                 "done", "read_at")

    def __init__(self, session: Session, record: Record, model: Model, inputs: list[Value],
                 deadline: float | None, priority: int):
        self.session = session
        self.record = record
        self.model = model
        self.inputs = inputs
        self.deadline = deadline
        self.priority = priority
        self.queued_at = 0.0
        self.read_at = 0.0
        self.done = False  # answered (or dropped): the record is no longer ours


def _on_host(response: tuple) -> tuple:
    """A parked response keeps no device tensors: it is written later, outside the stream
    that computed them."""
    rid, record_len, desc, payloads = response
    if any(isinstance(v, torch.Tensor) and v.is_cuda for _, _, v in payloads):
        payloads = [(o, n, v.cpu() if isinstance(v, torch.Tensor) else v)
                    for o, n, v in payloads]
    return rid, record_len, desc, payloads


class Session:
    version = 5  # the protocol version of its connection: 4 gets no error fields

    def __init__(self, session_id: str, segment: Segment, registry: Registry, executor: Executor,
                 on_fatal: Callable[[TensordError], None]):
        self.id = session_id
        self.seg = segment
        self.buf = segment.buf
        self.registry = registry
        self.executor = executor
        self.on_fatal = on_fatal
        req, resp = segment.req_ctl, segment.resp_ctl
        shm, efds = segment.shm, segment.efds
        self.requests_freed = Notifier(shm, req.producer_waiting, efds[EFD_REQ_SPACE])
        self.responses_ready = Notifier(shm, resp.consumer_waiting, efds[EFD_RESP_DATA])
        # The dispatcher waits on every session in one epoll call and asks for a post after
        # every publish (SPEC §4.5): the request ring's consumer_waiting stays 1.
        req.set_flag(req.consumer_waiting, 1)
        self._pinned: cuda.HostRegistration | None = None
        # Response layouts by output names, dtypes, shapes and sizes: callers repeat the same
        # shapes, and planning + encoding a descriptor is a large part of a small request.
        self._plans: dict[tuple, tuple[int, bytes, list[int]]] = {}
        # One lock for the session's ring state: the dispatcher takes records, compute threads
        # release them and write responses.
        self._lock = threading.Lock()
        self._parked: deque[tuple] = deque()  # responses waiting for ring space, in order
        self._running = 0  # jobs taken and not yet answered
        self.stopped = False
        self.served = 0
        # What one client can make the daemon log: rate-limited, so a flood of bad requests
        # is not a flood of log lines.
        self.log = RateLimited(log)

    # -- taking requests (dispatcher thread) ----------------------------------------------

    def take(self, limit: int) -> list[Job]:
        """Read up to `limit` records and turn each into a job; a request that cannot run gets
        its error response here. Raises ProtocolError(BAD_RECORD) for a corrupt ring."""
        with self._lock:
            if self.stopped or len(self._parked) >= MAX_PARKED:
                return []
            recs = self.seg.requests.poll(limit)
            self._running += len(recs)
        read_at = time.monotonic()
        jobs = []
        for rec in recs:
            try:
                jobs.append(self._job(rec, read_at))
            except TensordError as e:
                if e.fatal:
                    raise
                metrics.record_request(getattr(e, "model", "-"), e.code.name,
                                       total_s=time.monotonic() - read_at)
                self.finish(rec, error=e)
            except Exception as e:  # a daemon bug must cost one request, not the session
                self.log.exception("session %s: request %d failed", self.id[:8],
                                   rec.request_id)
                self.finish(rec, error=InternalError(
                    f"request {rec.request_id} failed inside the daemon: {type(e).__name__}: "
                    f"{e}"))
        return jobs

    def want_posts(self, on: bool) -> None:
        """Whether the client should post `rd` after publishing (the dispatcher sleeps)."""
        req = self.seg.req_ctl
        with self._lock:
            if not self.stopped:
                req.set_flag(req.consumer_waiting, 1 if on else 0)

    def idle(self) -> bool:
        """Nothing of this session is unread, queued, running or waiting to be written."""
        with self._lock:
            return self.stopped or (self._running == 0 and not self._parked
                                    and not self.seg.requests.published())

    def pending(self) -> bool:
        """Whether records wait in the request ring (more than one pass took)."""
        with self._lock:
            return (not self.stopped and len(self._parked) < MAX_PARKED
                    and self.seg.requests.published())

    def _job(self, rec: Record, read_at: float) -> Job:
        if rec.desc_len > MAX_DESCRIPTOR:  # before copying it out
            raise BadRequestError(f"descriptor of {rec.desc_len} bytes exceeds {MAX_DESCRIPTOR}")
        start = rec.offset + RECORD_HEADER_SIZE
        desc = decode_request(self.seg.shm.copy_out(start, rec.desc_len))
        check_refs(desc.inputs, rec.data_start, rec.record_len, "input")
        model = self.registry.get(desc.model)
        try:
            return self._job_for(model, rec, desc, read_at)
        except TensordError as e:
            e.model = model.name  # for the metrics of the request's model
            raise

    def _job_for(self, model: Model, rec: Record, desc, read_at: float) -> Job:
        limit = model.batching.max_input_bytes
        if limit and (total := sum(ref.nbytes for ref in desc.inputs)) > limit:
            raise TooLargeError(
                f"the request's inputs are {total} bytes; model {model.name!r} takes at most "
                f"{limit} (max_input_bytes in its config): send smaller requests", limit=limit)
        order = model.signature.order_inputs(model.name, desc.inputs)
        if model.device.startswith("cuda"):
            self._pin()  # H2D straight from the page-locked ring, D2H straight into it
        inputs = [self._input(rec, desc.inputs[i]) for i in order]
        deadline = read_at + desc.timeout_us / 1e6 if desc.timeout_us else None
        job = Job(self, rec, model, inputs, deadline, desc.priority or 0)
        job.read_at = read_at
        return job

    def _input(self, rec: Record, ref: TensorRef) -> Value:
        off = rec.offset + ref.offset
        dt = lookup(ref.dtype)
        shape = tuple(ref.shape)
        what = f"input {ref.name!r}"
        if dt.torch_dtype is None:
            return decode_byte_strings(self.buf[off:off + ref.nbytes], shape, what)
        t = records.read_tensor(self.buf, off, dt.torch_dtype, dt.itemsize, ref.nbytes, shape)
        # numpy, not torch: a torch reduction here would start an OpenMP pool in this thread
        # (see executor.py).
        if dt.name == "bool" and t.numel() and int(t.view(torch.uint8).numpy().max()) > 1:
            raise BadInputError(f"{what}: bool tensor holds bytes other than 0 and 1")
        return t

    # -- running a job inline (the dispatcher, for models without tensor math) ----------------

    def execute(self, job: Job) -> None:
        """Run one job right here and answer it; never raises."""
        outcome = "ok"
        try:
            outputs, dtypes = self.executor.run(job.model, job.inputs, None, job.deadline)
            self.answer(job, [s.name for s in job.model.signature.outputs], outputs, dtypes)
        except TensordError as e:
            outcome = e.code.name
            job.inputs = []
            self.finish(job.record, error=e)
        except Exception as e:  # a daemon bug must cost one request, not the session
            outcome = "INTERNAL"
            self.log.exception("session %s: request %d failed", self.id[:8],
                               job.record.request_id)
            job.inputs = []
            self.finish(job.record, error=InternalError(
                f"request {job.record.request_id} failed inside the daemon: "
                f"{type(e).__name__}: {e}"))
        metrics.record_request(job.model.name, outcome, total_s=time.monotonic() - job.read_at)

    def answer(self, job: Job, names: list[str], outputs: list[Value], dtypes: list[str],
               sync: Callable[[], None] | None = None) -> None:
        """Write a job's outputs as its response (raises TooLargeError before writing)."""
        response = self._response(job.record.request_id, names, outputs, dtypes)
        job.inputs = []  # drop views of the request record before it is released
        self.finish(job.record, response=response, sync=sync)

    def _pin(self) -> None:
        with self._lock:
            if self._pinned is None and not self.stopped:
                self._pinned = cuda.HostRegistration(self.seg.address(),
                                                     self.seg.header.segment_size)

    # -- responses ------------------------------------------------------------------------

    def _response(self, rid: int, names: list[str], outputs: list[Value],
                  dtypes: list[str]) -> tuple:
        sizes = [records.nbytes(v) for v in outputs]
        key = (tuple(names), tuple(dtypes), tuple(tuple(v.shape) for v in outputs), tuple(sizes))
        planned = self._plans.get(key)
        if planned is None:
            def encode(offsets: list[int]) -> bytes:
                return encode_descriptor(ResponseDescriptor(outputs=[
                    TensorRef(name, dtype, list(v.shape), o, n)
                    for name, dtype, v, o, n in zip(names, dtypes, outputs, offsets, sizes)]))

            planned = records.plan(sizes, encode)
            if len(self._plans) >= PLAN_CACHE:
                self._plans.clear()
            self._plans[key] = planned
        record_len, desc, offsets = planned
        cap = self.seg.responses.capacity
        if record_len > cap:
            raise TooLargeError(
                f"the outputs need a {record_len}-byte response record but this session's "
                f"response ring holds {cap} bytes: connect with a response ring of at least "
                f"{ring_capacity(record_len, 0)} bytes (Go: WithRingSize)")
        return (rid, record_len, desc, list(zip(offsets, sizes, outputs)))

    def finish(self, rec: Record, response: tuple | None = None,
               error: TensordError | None = None,
               sync: Callable[[], None] | None = None) -> None:
        """Answer a taken record and release it. A response that does not fit the response
        ring now is parked until the client frees space (the dispatcher retries it), so no
        thread ever waits on one client."""
        if response is None and error is not None:
            msg = error.message[:MAX_ERROR_MESSAGE]
            fields = error_fields(error) if self.version >= 5 else (None, None, None)
            desc = encode_descriptor(ResponseDescriptor(
                error=ErrorInfo(int(error.code), error.code.name, msg, *fields)))
            response = (rec.request_id, align64(RECORD_HEADER_SIZE + len(desc)), desc, [])
        with self._lock:
            self._running -= 1
            if not self.stopped and response is not None:
                if self._parked or not self._write(response, sync):
                    self._parked.append(_on_host(response))
                    self._want_space()
                if self.seg.requests.release(rec):
                    self.requests_freed.notify()
                if error is None:
                    self.served += 1
            free = self.stopped and self._running == 0
        if free:
            self._free()

    def flush(self) -> None:
        """Write parked responses that fit now (the dispatcher calls this when the client
        released response-ring space)."""
        with self._lock:
            if self.stopped:
                return
            while self._parked and self._write(self._parked[0], None):
                self._parked.popleft()
            if self._parked:
                self._want_space()
            else:
                resp = self.seg.resp_ctl
                resp.set_flag(resp.producer_waiting, 0)

    def _want_space(self) -> None:
        # Ask for a post of `ps` (SPEC §4.5); the dispatcher waits on it. A release that
        # happened before the flag was set is caught by the re-check.
        resp = self.seg.resp_ctl
        resp.set_flag(resp.producer_waiting, 1)
        if self.seg.responses.fits(self._parked[0][1]):
            self.seg.shm.post(self.seg.efds[EFD_RESP_SPACE])  # our own: the dispatcher flushes

    def _write(self, response: tuple, sync: Callable[[], None] | None) -> bool:
        """Write one response record if it fits now; under the lock."""
        rid, record_len, desc, payloads = response
        ring = self.seg.responses
        off = ring.try_reserve(record_len)
        if off is None:
            return False
        try:
            # Device outputs are copied straight into the (page-locked) ring, asynchronously...
            records.write(self.seg, off, KIND_RESPONSE, rid, record_len, desc, payloads)
            if sync is not None:
                sync()  # ...so wait for those copies before the client may read them.
        except BaseException as e:
            # The space is reserved and will be published with whatever follows: make it a
            # PAD (SPEC §4.3), never a response with half-written bytes.
            records.write(self.seg, off, KIND_PAD, 0, record_len, b"", [])
            ring.publish()
            log.warning("session %s: writing response %d failed: %s", self.id[:8], rid, e)
            return True
        ring.publish()
        self.responses_ready.notify()
        return True

    # -- end ------------------------------------------------------------------------------

    def end(self) -> None:
        """Stop answering and free the session once nothing runs for it any more: at once when
        idle, else when its last running request finishes (its response is dropped). Never
        waits. The dispatcher must have forgotten the session already."""
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
            self._parked.clear()
            if self._running:
                return  # finish() frees it
        self._free()

    def _free(self) -> None:
        if self._pinned is not None:
            self._pinned.release()  # before unmapping: CUDA must not keep a dangling range
        with SPIN_GUARD:
            closed = self.seg.close()
        if not closed:
            log.warning("session %s: tensors still view its memory; it is freed when they go",
                        self.id[:8])
