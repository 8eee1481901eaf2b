"""Request and response descriptors of SPEC §4.4 and their validation."""

from __future__ import annotations

from dataclasses import dataclass, field

from .codec import WireTypeError, from_wire, packb, to_wire, unpackb
from .dtypes import lookup, numel
from .errors import BadInputError, BadRequestError

MAX_DESCRIPTOR = 65536
MAX_TENSORS = 64
MAX_RANK = 16
MAX_NAME = 256
MAX_DIM = 1 << 48  # no tensor has more elements; keeps size arithmetic far from overflow
ALIGN = 64


def align64(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


@dataclass
class TensorRef:
    name: str
    dtype: str
    shape: list[int]
    offset: int
    nbytes: int


PRIORITIES = 2  # 0 normal (the default, not written), 1 high


@dataclass
class RequestDescriptor:
    model: str
    timeout_us: int
    inputs: list[TensorRef]
    priority: int | None = field(default=None, metadata={"omit_none": True})


@dataclass
class ErrorInfo:
    code: int
    name: str
    message: str
    # Protocol 5, written only when known (SPEC §6 "Error fields").
    input: str | None = field(default=None, metadata={"omit_none": True})
    item: int | None = field(default=None, metadata={"omit_none": True})
    limit: int | None = field(default=None, metadata={"omit_none": True})


@dataclass
class ResponseDescriptor:
    outputs: list[TensorRef] | None = field(default=None, metadata={"omit_none": True})
    error: ErrorInfo | None = field(default=None, metadata={"omit_none": True})


def encode_descriptor(desc: RequestDescriptor | ResponseDescriptor) -> bytes:
    return packb(to_wire(desc))


def decode_request(data: bytes) -> RequestDescriptor:
    """Descriptor bytes -> RequestDescriptor; BAD_REQUEST when it is not one."""
    if len(data) > MAX_DESCRIPTOR:
        raise BadRequestError(f"descriptor of {len(data)} bytes exceeds {MAX_DESCRIPTOR}")
    try:
        value = unpackb(data)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise BadRequestError(f"request descriptor is not valid msgpack ({e})") from None
    desc = _fast_request(value)
    if desc is None:
        try:
            desc = from_wire(RequestDescriptor, value, "request")
        except WireTypeError as e:
            raise BadRequestError(str(e)) from None
    if len(desc.inputs) > MAX_TENSORS:
        raise BadRequestError(f"{len(desc.inputs)} inputs; at most {MAX_TENSORS} are allowed")
    for s in [desc.model] + [t.name for t in desc.inputs]:
        if len(s.encode()) > MAX_NAME:
            raise BadRequestError(f"name {s[:40]!r}... is longer than {MAX_NAME} bytes")
    if desc.timeout_us < 0:
        raise BadRequestError("timeout_us is negative")
    if desc.priority is not None and not 0 <= desc.priority < PRIORITIES:
        raise BadRequestError(f"priority {desc.priority} is not 0 (normal) or 1 (high)")
    return desc


def _fast_request(value) -> RequestDescriptor | None:
    """The well-formed case, checked with plain type() tests: this runs once per request.
    Anything unexpected returns None, and the generic checker produces the precise error."""
    try:
        model, timeout_us, inputs = value["model"], value["timeout_us"], value["inputs"]
        if type(model) is not str or type(timeout_us) is not int or type(inputs) is not list:
            return None
        refs = []
        for t in inputs:
            name, dtype, shape = t["name"], t["dtype"], t["shape"]
            offset, nbytes = t["offset"], t["nbytes"]
            if (type(name) is not str or type(dtype) is not str or type(shape) is not list
                    or type(offset) is not int or type(nbytes) is not int
                    or not all(type(d) is int for d in shape)):
                return None
            refs.append(TensorRef(name, dtype, shape, offset, nbytes))
        priority = value.get("priority")
        if priority is not None and type(priority) is not int:
            return None
    except (KeyError, TypeError, AttributeError):
        return None
    return RequestDescriptor(model, timeout_us, refs, priority)


def decode_response(data: bytes) -> ResponseDescriptor:
    try:
        desc = from_wire(ResponseDescriptor, unpackb(data), "response")
    except Exception as e:
        raise BadRequestError(f"response descriptor is invalid ({e})") from None
    if (desc.outputs is None) == (desc.error is None):
        raise BadRequestError("response descriptor must have exactly one of outputs, error")
    if desc.outputs is not None and len(desc.outputs) > MAX_TENSORS:
        raise BadRequestError(f"response has {len(desc.outputs)} outputs; at most {MAX_TENSORS} "
                              "are allowed")
    err = desc.error
    if err is not None and any(v is not None and not 0 <= v < 1 << 64
                               for v in (err.item, err.limit)):
        raise BadRequestError("response error's item and limit must be unsigned integers")
    return desc


def check_refs(refs: list[TensorRef], data_start: int, record_len: int, what: str) -> None:
    """Check SPEC §4.3/§5 for every tensor ref before any byte of it is touched."""
    spans = []
    for t in refs:
        dt = lookup(t.dtype)
        if len(t.shape) > MAX_RANK:
            raise BadInputError(f"{what} {t.name!r}: rank {len(t.shape)} exceeds {MAX_RANK}")
        # max(d, 1): a tensor with a 0 dimension holds nothing, but its other dimensions
        # still make strides, which overflow (torch: "Stride calculation overflowed")
        if any(d < 0 or d > MAX_DIM for d in t.shape) or \
                numel([max(d, 1) for d in t.shape]) > MAX_DIM:
            raise BadInputError(f"{what} {t.name!r}: shape {t.shape} has a negative or "
                                "impossibly large dimension")
        if t.offset % ALIGN:
            raise BadInputError(f"{what} {t.name!r}: offset {t.offset} is not 64-byte aligned")
        if t.offset < data_start or t.nbytes < 0 or t.offset + t.nbytes > record_len:
            raise BadInputError(
                f"{what} {t.name!r}: bytes [{t.offset}, {t.offset + t.nbytes}) lie outside the "
                f"record's data area [{data_start}, {record_len})"
            )
        if dt.itemsize:
            want = numel(t.shape) * dt.itemsize
            if want != t.nbytes:
                raise BadInputError(
                    f"{what} {t.name!r}: shape {t.shape} of {t.dtype} needs {want} bytes, "
                    f"nbytes says {t.nbytes}"
                )
        spans.append((t.offset, t.offset + t.nbytes, t.name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise BadInputError(f"{what}s {a!r} and {b!r} overlap")
