"""Python reference client: the same protocol the Go client speaks, for tests and Python users.

    with Client() as c:
        out = c.infer("identity", {"x": np.arange(4.0)})   # numpy in, numpy out
        out = c.infer("identity", {"x": torch.arange(4.0)})  # torch in, torch out

It needs numpy and msgpack only: torch is used when the caller passes torch tensors (or,
when no input is an array at all, when torch is installed), never imported otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Union

import numpy as np

from ..config import default_socket_path
from ..contract.descriptors import (
    MAX_TENSORS,
    RequestDescriptor,
    TensorRef,
    check_refs,
    decode_response,
    encode_descriptor,
)
from ..contract.dtypes import (
    ByteStrings,
    DType,
    decode_byte_strings,
    from_numpy,
    from_torch,
    lookup,
)
from ..contract.errors import (
    BadInputError,
    BadRequestError,
    ConnectionClosedError,
    DeadlineError,
    ProtocolError,
    ShuttingDownError,
    TooLargeError,
    error_from_code,
)
from ..contract.frames import PeerClosed, encode_frame, read_frame, read_frame_with_fds
from ..contract.layout import KIND_REQUEST, RECORD_HEADER_SIZE
from ..contract.messages import (
    PROTOCOL_VERSION,
    Attached,
    Draining,
    Error,
    Goodbye,
    Health,
    HealthReport,
    Hello,
    Load,
    ModelInfo,
    ModelList,
    Models,
    ModelStat,
    ModelStats,
    Ping,
    Pong,
    Ready,
    Reload,
    Stats,
    Unload,
    Welcome,
)
from ..transport import records
from ..transport.ring import Record
from ..transport.segment import (
    EFD_REQ_DATA,
    EFD_REQ_SPACE,
    EFD_RESP_DATA,
    EFD_RESP_SPACE,
    Segment,
)
from ..transport.waiting import Notifier, Waiter
from ..unixsock import connect_daemon

if TYPE_CHECKING:
    import torch

Value = Union["torch.Tensor", np.ndarray, ByteStrings]


class Client:
    def __init__(self, path: str | None = None, *, request_ring: int = 0, response_ring: int = 0,
                 spin: float = 0.0, name: str = "tensord-python", timeout: float = 10.0,
                 max_version: int = PROTOCOL_VERSION):
        self.path = path or default_socket_path()
        self.sock = connect_daemon(self.path, timeout)
        self.draining = False
        try:
            # Protocol 4 daemons are spoken to as well; they send no error fields and no
            # `idempotent` (SPEC §9).
            # (max_version: a lower one speaks as an older client would, for tests.)
            self._send(Hello(min_version=4, max_version=max_version,
                             client=name, request_ring=request_ring,
                             response_ring=response_ring))
            welcome, fds = read_frame_with_fds(self.sock)
        except (TimeoutError, PeerClosed, ConnectionError) as e:
            self.sock.close()
            what = (f"did not answer within {timeout:g} s" if isinstance(e, TimeoutError)
                    else "closed the connection")
            raise ConnectionClosedError(
                f"the daemon at {self.path} {what} during the handshake: is it stopped or "
                "overloaded? (`tensord health` tells)") from None
        if not isinstance(welcome, Welcome):
            for fd in fds:
                os.close(fd)
            if isinstance(welcome, Error):
                raise _error(welcome, fatal=welcome.fatal)
            raise ProtocolError(f"expected a welcome, the daemon sent {type(welcome).TYPE}",
                                fatal=True)
        self.welcome = welcome
        self.seg = Segment.attach(fds, welcome.segment_size, welcome.request_ring,
                                  welcome.response_ring)
        self._send(Attached())
        self._expect(Ready)
        self.sock.settimeout(None)
        seg = self.seg
        req, resp, shm, efds = seg.req_ctl, seg.resp_ctl, seg.shm, seg.efds
        self._req_space = Waiter(shm, req.head_at, req.producer_waiting, efds[EFD_REQ_SPACE],
                                 spin)
        self._req_data = Notifier(shm, req.consumer_waiting, efds[EFD_REQ_DATA])
        self._resp_data = Waiter(shm, resp.tail_at, resp.consumer_waiting,
                                 efds[EFD_RESP_DATA], spin)
        self._resp_space = Notifier(shm, resp.producer_waiting, efds[EFD_RESP_SPACE])
        self._ids = itertools.count(1)
        self._infer_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._replies: dict[int, list] = {}
        self._replies_cv = threading.Condition()
        self._closed_reason: str | None = None
        self._reader = threading.Thread(target=self._read_control, daemon=True,
                                        name="tensord-control")
        self._reader.start()

    # -- control channel -------------------------------------------------------------------

    def _send(self, msg) -> None:
        data = encode_frame(msg)
        with getattr(self, "_send_lock", contextlib.nullcontext()):
            self.sock.sendall(data)

    def _expect(self, cls):
        msg = read_frame(self.sock)
        if isinstance(msg, Error):
            raise _error(msg, fatal=msg.fatal)
        if not isinstance(msg, cls):
            raise ProtocolError(f"expected {cls.TYPE}, daemon sent {type(msg).TYPE}", fatal=True)
        return msg

    def _read_control(self) -> None:
        reason = "the daemon closed the connection"
        try:
            while True:
                msg = read_frame(self.sock)
                if isinstance(msg, Error) and msg.fatal:
                    reason = f"the daemon ended the session: {msg.name}: {msg.message}"
                    break
                if isinstance(msg, Draining):
                    # Finish what was sent; new calls go to the daemon that replaces this one.
                    self.draining = True
                    threading.Thread(target=self._leave_after_drain, daemon=True).start()
                    continue
                if isinstance(msg, Goodbye):
                    reason = f"the daemon said goodbye: {msg.reason}"
                    break
                rid = getattr(msg, "id", 0)
                with self._replies_cv:
                    self._replies[rid] = [msg]
                    self._replies_cv.notify_all()
        except (PeerClosed, OSError, ProtocolError) as e:
            if not isinstance(e, PeerClosed):
                reason = f"control connection failed: {e}"
        with self._replies_cv:
            self._closed_reason = reason
            self._replies_cv.notify_all()

    def _call(self, msg, timeout: float = 10.0):
        self._check_open()
        self._send(msg)
        deadline = time.monotonic() + timeout
        with self._replies_cv:
            while msg.id not in self._replies:
                if self._closed_reason:
                    raise ConnectionClosedError(self._closed_reason)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineError(f"no reply to {msg.TYPE} within {timeout} s")
                self._replies_cv.wait(left)
            (reply,) = self._replies.pop(msg.id)
        if isinstance(reply, Error):
            raise _error(reply)
        return reply

    def _leave_after_drain(self) -> None:
        """Once the call in flight (if any) is answered, say goodbye: the draining daemon
        may end the session then, knowing nothing more will be sent on it (SPEC draining)."""
        with self._infer_lock, contextlib.suppress(OSError):
            self._send(Goodbye(reason="the daemon is draining"))

    def _check_open(self) -> None:
        if self._closed_reason:
            raise ConnectionClosedError(self._closed_reason)

    def models(self) -> list[ModelInfo]:
        reply = self._call(Models(id=next(self._ids)))
        assert isinstance(reply, ModelList)
        return reply.models

    def stats(self) -> list[ModelStat]:
        """Every model's scheduling counters: queue length, batch sizes, queue and compute
        time, served, rejected, expired (SPEC `model_stats`)."""
        reply = self._call(Stats(id=next(self._ids)))
        assert isinstance(reply, ModelStats)
        return reply.models

    def health(self) -> HealthReport:
        """Whether the daemon can serve: not draining, no model stuck in a forward pass."""
        reply = self._call(Health(id=next(self._ids)))
        assert isinstance(reply, HealthReport)
        return reply

    def ping(self) -> None:
        assert isinstance(self._call(Ping(id=next(self._ids))), Pong)

    # Admin messages: the daemon checks the caller's uid against its admin_uids.

    def load(self, name: str, config: Mapping[str, object], timeout: float = 300.0) -> None:
        """Load a model from a config table like the TOML file's [[models]] entries."""
        self._call(Load(id=next(self._ids), name=name, config=dict(config)), timeout)

    def reload(self, name: str, timeout: float = 300.0) -> None:
        self._call(Reload(id=next(self._ids), name=name), timeout)

    def unload(self, name: str, timeout: float = 60.0) -> None:
        self._call(Unload(id=next(self._ids), name=name), timeout)

    # -- inference -------------------------------------------------------------------------

    def infer(self, model: str, inputs: Mapping[str, Value | np.ndarray],
              timeout: float | None = None, budget: float | None = None,
              priority: int = 0) -> dict[str, Value]:
        """Run `model`; returns its outputs by name, copied out of shared memory. `timeout`
        bounds the wait here; `budget` (default: `timeout`) is the time the daemon is told it
        has (SPEC `timeout_us`), after which it answers DEADLINE instead of running the
        model. `priority` 1 (high) is served before 0 (normal) in the model's queue."""
        if timeout is not None and timeout < 0 or budget is not None and budget < 0:
            raise BadRequestError("timeout and budget must not be negative (None: no limit)")
        if len(inputs) > MAX_TENSORS:
            raise BadRequestError(f"{len(inputs)} inputs; a request carries at most "
                                  f"{MAX_TENSORS} (SPEC §7)")
        values: dict[str, Value] = {}
        dtypes: list[str] = []
        kinds = set()
        for k, v in inputs.items():
            value, dtype, kind = _as_value(v)
            values[k] = value
            dtypes.append(dtype)
            kinds.add(kind)
        as_torch = "torch" in kinds or "numpy" not in kinds and _torch_installed()
        names = list(values)
        sizes = [records.nbytes(v) for v in values.values()]
        budget = timeout if budget is None else budget
        timeout_us = int(budget * 1e6) if budget else 0

        def encode(offsets: list[int]) -> bytes:
            return encode_descriptor(RequestDescriptor(model=model, timeout_us=timeout_us,
                inputs=[TensorRef(n, d, list(v.shape), o, s) for n, d, v, o, s
                        in zip(names, dtypes, values.values(), offsets, sizes)],
                priority=priority or None))

        record_len, desc, offsets = records.plan(sizes, encode)
        ring = self.seg.requests
        if record_len > ring.capacity:
            raise TooLargeError(  # refused before writing: it certainly did not run
                f"the request needs a {record_len}-byte record but the request ring holds "
                f"{ring.capacity} bytes: connect with a larger request_ring", ran=False,
                limit=ring.capacity)
        deadline = time.monotonic() + timeout if timeout else None
        with self._infer_lock:
            self._check_open()
            if self.draining:
                raise ShuttingDownError(f"the daemon at {self.path} is draining (stopping): "
                                        "connect again once it has been replaced")
            rid = next(self._ids)
            while (off := ring.try_reserve(record_len)) is None:
                if not self._req_space.wait(lambda: ring.fits(record_len), ring.head,
                                            self._stopped, deadline):
                    self._check_open()
                    raise DeadlineError("timed out waiting for request ring space")
            records.write(self.seg, off, KIND_REQUEST, rid, record_len, desc,
                          list(zip(offsets, sizes, values.values())))
            ring.publish()
            self._req_data.notify()
            return self._await(rid, deadline, as_torch)

    def _stopped(self) -> bool:
        return self._closed_reason is not None

    def _await(self, rid: int, deadline: float | None,
               as_torch: bool = True) -> dict[str, Value]:
        ring = self.seg.responses
        while True:
            if not self._resp_data.wait(ring.published, lambda: ring.read, self._stopped,
                                        deadline):
                if self._closed_reason:  # after publishing: the model may have run
                    raise ConnectionClosedError(self._closed_reason, ran=None)
                # Published: the daemon may be running it. Not safe to retry (SPEC §6).
                raise DeadlineError(f"no response to request {rid} before the deadline; it was "
                                    "sent, so the model may have run", ran=None)
            result = None
            for rec in ring.poll():
                try:
                    if rec.request_id == rid:
                        result = self._read_response(rec, as_torch)
                finally:
                    if ring.release(rec):
                        self._resp_space.notify()
            if result is not None:
                return result

    def _read_response(self, rec: Record, as_torch: bool = True) -> dict[str, Value]:
        buf = self.seg.buf
        d0 = rec.offset + RECORD_HEADER_SIZE
        desc = decode_response(bytes(buf[d0:d0 + rec.desc_len]))
        if desc.error is not None:
            raise _error(desc.error)
        check_refs(desc.outputs, rec.data_start, rec.record_len, "output")
        out: dict[str, Value] = {}
        for ref in desc.outputs:
            off = rec.offset + ref.offset
            dt = lookup(ref.dtype)
            shape = tuple(ref.shape)
            if dt.itemsize == 0:
                out[ref.name] = decode_byte_strings(buf[off:off + ref.nbytes], shape, ref.name)
            elif as_torch:
                view = records.read_tensor(buf, off, dt.torch_dtype, dt.itemsize, ref.nbytes,
                                           shape)
                out[ref.name] = view.clone()
                del view
            else:
                out[ref.name] = np.frombuffer(buf, _numpy_dtype(dt, ref.name),
                                              ref.nbytes // dt.itemsize, off).reshape(shape).copy()
        return out

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            self._send(Goodbye(reason="client closed"))
            self.sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(timeout=5)
        self.sock.close()
        with self._infer_lock:
            self.seg.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _error(e, fatal: bool = False):
    """The exception for a wire error (an `error` message or a response's error map), with
    the input, item and limit it names (protocol 5)."""
    return error_from_code(e.code, e.message, fatal=fatal, input=e.input, item=e.item,
                           limit=e.limit)


def _as_value(v) -> tuple[Value, str, str]:
    """An input as the client sends it: (value, wire dtype, "torch" | "numpy" | "bytes")."""
    if isinstance(v, ByteStrings):
        return v, "bytes", "bytes"
    torch = sys.modules.get("torch")  # a torch tensor means torch is imported already
    if torch is not None and isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        return t, from_torch(t.dtype).name, "torch"
    if isinstance(v, np.ndarray):
        a = np.ascontiguousarray(v)
        return a, from_numpy(a.dtype).name, "numpy"
    raise TypeError(f"inputs must be numpy arrays, torch tensors or ByteStrings, not "
                    f"{type(v).__name__}")


def _numpy_dtype(dt: DType, name: str) -> np.dtype:
    if dt.numpy is not None:
        return np.dtype(dt.numpy)
    try:  # bf16: numpy has no such dtype; ml_dtypes (JAX's) adds one
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    except ImportError:
        raise BadInputError(f"output {name!r} is bf16, which numpy cannot hold: pass torch "
                            "tensors (outputs then come back as torch tensors), or install "
                            "ml_dtypes") from None


_torch_found: list[bool] = []


def _torch_installed() -> bool:
    if not _torch_found:
        _torch_found.append(importlib.util.find_spec("torch") is not None)
    return _torch_found[0]


from .reconnect import ReconnectingClient  # noqa: E402  (it builds on Client)

__all__ = ["Client", "ReconnectingClient", "ByteStrings"]
