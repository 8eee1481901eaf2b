"""A client's session on the daemon side: reads its request ring, runs models, answers in
its response ring. One thread per session; sessions never share rings or locks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from . import cuda
from .contract.descriptors import (
    MAX_DESCRIPTOR,
    ErrorInfo,
    ResponseDescriptor,
    TensorRef,
    align64,
    check_refs,
    decode_request,
    encode_descriptor,
)
from .contract.dtypes import decode_byte_strings, lookup
from .contract.errors import (
    BadInputError,
    BadRequestError,
    InternalError,
    TensordError,
    TooLargeError,
)
from .contract.layout import KIND_PAD, KIND_RESPONSE, RECORD_HEADER_SIZE, ring_capacity
from .executor import Executor
from .models.registry import Registry
from .models.signature import Value
from .transport import records
from .transport.ring import Record
from .transport.segment import (
    SEM_REQ_DATA,
    SEM_REQ_SPACE,
    SEM_RESP_DATA,
    SEM_RESP_SPACE,
    Segment,
)
from .transport.waiting import Notifier, Waiter

log = logging.getLogger(__name__)

MAX_ERROR_MESSAGE = 4000
PLAN_CACHE = 256
# Records taken from the ring per poll: a ring full of tiny records must not turn into
# millions of Python objects at once.
MAX_BATCH = 64


class _Stopped(Exception):
    pass


class Session:
    def __init__(self, session_id: str, segment: Segment, registry: Registry, executor: Executor,
                 on_fatal: Callable[[TensordError], None], spin: float = 0.0):
        self.id = session_id
        self.seg = segment
        self.buf = segment.buf
        self.registry = registry
        self.executor = executor
        self.on_fatal = on_fatal
        req, resp = segment.req_ctl, segment.resp_ctl
        self.requests_ready = Waiter(segment.sems[SEM_REQ_DATA], req, req.consumer_waiting, spin)
        self.requests_freed = Notifier(segment.sems[SEM_REQ_SPACE], req, req.producer_waiting)
        self.responses_ready = Notifier(segment.sems[SEM_RESP_DATA], resp, resp.consumer_waiting)
        self.responses_freed = Waiter(segment.sems[SEM_RESP_SPACE], resp, resp.producer_waiting,
                                      spin)
        self._pinned: cuda.HostRegistration | None = None
        self._streams: dict[str, cuda.SideStream] = {}
        # Response layouts by output names, dtypes, shapes and sizes: callers repeat the same
        # shapes, and planning + encoding a descriptor is a large part of a small request.
        self._plans: dict[tuple, tuple[int, bytes, list[int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"session-{session_id[:8]}",
                                        daemon=True)
        self.served = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop reading, let a running request finish, drop the mapping."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        if self._pinned is not None:
            self._pinned.release()  # before unmapping: CUDA must not keep a dangling range
        if not self.seg.close():
            log.warning("session %s: tensors still view its memory; it is freed when they go",
                        self.id[:8])

    # -- the request loop -----------------------------------------------------------------

    def _run(self) -> None:
        ring = self.seg.requests
        try:
            while not self._stop.is_set():
                if not self.requests_ready.wait(ring.published, self._stop.is_set):
                    continue
                batch = ring.poll(MAX_BATCH)
                read_at = time.monotonic()
                for rec in batch:
                    self._serve(rec, read_at)
                    if self._stop.is_set():
                        return
        except _Stopped:
            return
        except TensordError as e:
            log.warning("session %s: %s", self.id[:8], e)
            self.on_fatal(e)
        except Exception as e:
            log.exception("session %s failed", self.id[:8])
            self.on_fatal(InternalError(f"session failed: {type(e).__name__}: {e}", fatal=True))

    def _serve(self, rec: Record, read_at: float) -> None:
        rid = rec.header.request_id
        inputs: list[Value] = []
        stream: cuda.SideStream | None = None
        try:
            start = rec.offset + RECORD_HEADER_SIZE
            if rec.header.desc_len > MAX_DESCRIPTOR:  # before copying it out
                raise BadRequestError(f"descriptor of {rec.header.desc_len} bytes exceeds "
                                      f"{MAX_DESCRIPTOR}")
            desc = decode_request(bytes(self.buf[start:start + rec.header.desc_len]))
            check_refs(desc.inputs, rec.data_start, rec.header.record_len, "input")
            model = self.registry.get(desc.model)
            order = model.signature.order_inputs(model.name, desc.inputs)
            inputs = [self._input(rec, desc.inputs[i]) for i in order]
            deadline = read_at + desc.timeout_us / 1e6 if desc.timeout_us else None
            names = [s.name for s in model.signature.outputs]
            if model.device.startswith("cuda"):
                stream = self._stream_for(model.device)
                outputs, dtypes = self.executor.run(model, inputs, stream.stream, deadline,
                                                    self._stop.is_set)
                # Outputs a model already moved to the CPU with non_blocking=True are still in
                # flight: wait for the stream before any byte is copied into the ring...
                stream.synchronize()
                with stream.context():  # ...and queue the D2H copies of device outputs on it
                    self._respond(rid, names, outputs, dtypes, stream.synchronize)
            else:
                outputs, dtypes = self.executor.run(model, inputs, None, deadline,
                                                    self._stop.is_set)
                self._respond(rid, names, outputs, dtypes)
            self.served += 1
        except TensordError as e:
            if e.fatal:
                raise
            self._respond_error(rid, e)
        except _Stopped:
            raise
        except Exception as e:  # a daemon bug must cost one request, not the session
            log.exception("session %s: request %d failed", self.id[:8], rid)
            self._respond_error(rid, InternalError(
                f"request {rid} failed inside the daemon: {type(e).__name__}: {e}"))
        finally:
            if stream is not None:
                stream.synchronize()  # no H2D copy may still read the record we release
            inputs.clear()  # drop views of the request record before releasing it
            if self.seg.requests.release(rec):
                self.requests_freed.notify()

    def _stream_for(self, device: str) -> cuda.SideStream:
        if self._pinned is None:
            self._pinned = cuda.HostRegistration(self.seg.address(), self.seg.header.segment_size)
        st = self._streams.get(device)
        if st is None:
            st = self._streams[device] = cuda.SideStream(torch.device(device))
        return st

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

    # -- responses ------------------------------------------------------------------------

    def _respond(self, rid: int, names: list[str], outputs: list[Value], dtypes: list[str],
                 sync: Callable[[], None] | None = None):
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
                f"{ring_capacity(record_len, 0)} bytes (Go: WithRingSize)"
            )
        off = self._reserve(record_len)
        try:
            # Device outputs are copied straight into the (page-locked) ring, asynchronously...
            records.write(self.buf, off, KIND_RESPONSE, rid, record_len, desc,
                          list(zip(offsets, sizes, outputs)))
            if sync is not None:
                sync()  # ...so wait for those copies before the client may read them.
        except BaseException:
            # The space is reserved and will be published with whatever follows: make it a
            # PAD (SPEC §4.3), never a response with half-written bytes.
            records.write(self.buf, off, KIND_PAD, 0, record_len, b"", [])
            raise
        self._publish()

    def _respond_error(self, rid: int, err: TensordError) -> None:
        msg = err.message[:MAX_ERROR_MESSAGE]
        desc = encode_descriptor(ResponseDescriptor(
            error=ErrorInfo(int(err.code), err.code.name, msg)))
        record_len = align64(RECORD_HEADER_SIZE + len(desc))
        off = self._reserve(record_len)
        records.write(self.buf, off, KIND_RESPONSE, rid, record_len, desc, [])
        self._publish()

    def _reserve(self, record_len: int) -> int:
        ring = self.seg.responses
        while True:
            off = ring.try_reserve(record_len)
            if off is not None:
                return off
            # The client still holds earlier responses; only this session waits for it.
            if not self.responses_freed.wait(lambda: ring.fits(record_len), self._stop.is_set):
                if self._stop.is_set():
                    raise _Stopped

    def _publish(self) -> None:
        self.seg.responses.publish()
        self.responses_ready.notify()

