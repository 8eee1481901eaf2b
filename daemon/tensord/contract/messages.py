"""Control-channel messages of SPEC §2.4, one dataclass each, fields in canonical order."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .codec import WireTypeError, from_wire, to_wire
from .errors import ErrorCode, ProtocolError

# Version 5: model info says whether a model is `idempotent`, and errors name the input, item
# and limit they are about (SPEC §9); a daemon speaks 4 too, leaving those fields out.
# Version 4: model info carries what serves a model (`kind`), what each tensor means and the
# model's limits. Version 3: wake-ups are eventfds that ride with the segment's memfd on the
# welcome frame (SCM_RIGHTS).
PROTOCOL_VERSION = 5
SUPPORTED_VERSIONS = (4, 5)


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int] | None
    meaning: str = ""  # SPEC §2.4: "image", "pixels", "text", "labels", ...; "" = not stated


@dataclass
class ModelLimits:
    """SPEC §2.4 model limits; 0 (or no formats) = no such limit."""
    max_batch: int = 0  # items per request (first dimension of each input)
    max_bytes: int = 0  # bytes of one item of a bytes input (an image file, a text)
    max_pixels: int = 0  # width x height of one image
    max_tokens: int = 0  # tokens of a text the model reads; longer texts are truncated
    formats: list[str] = field(default_factory=list)  # image formats decoded, e.g. "png"


@dataclass
class ModelInfo:
    name: str
    version: int
    device: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    kind: str = ""  # what serves it: "torchscript", "export", "handler", "vision.classify", ...
    limits: ModelLimits = field(default_factory=ModelLimits)
    # Protocol 5: running a request twice has the effect of running it once, so a client may
    # make a request that may have run again (SPEC §6). None: not sent (a protocol 4 session).
    idempotent: bool | None = field(default=None, metadata={"omit_none": True})


@dataclass
class Hello:
    TYPE: ClassVar[str] = "hello"
    min_version: int
    max_version: int
    client: str
    request_ring: int
    response_ring: int
    # SPEC §2.4: True asks for a connection without a session (no segment, no eventfds) for
    # control messages only (probes, stats, admin); written only when true.
    control_only: bool | None = field(default=None, metadata={"omit_none": True})


@dataclass
class Welcome:
    TYPE: ClassVar[str] = "welcome"
    version: int
    session: str
    segment_size: int
    request_ring: int
    response_ring: int
    max_frame: int
    daemon: str


@dataclass
class Attached:
    TYPE: ClassVar[str] = "attached"


@dataclass
class Ready:
    TYPE: ClassVar[str] = "ready"


@dataclass
class Models:
    TYPE: ClassVar[str] = "models"
    id: int


@dataclass
class ModelList:
    TYPE: ClassVar[str] = "model_list"
    id: int
    models: list[ModelInfo]


@dataclass
class Ping:
    TYPE: ClassVar[str] = "ping"
    id: int


@dataclass
class Pong:
    TYPE: ClassVar[str] = "pong"
    id: int


@dataclass
class Load:
    TYPE: ClassVar[str] = "load"
    id: int
    name: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Unload:
    TYPE: ClassVar[str] = "unload"
    id: int
    name: str


@dataclass
class Reload:
    TYPE: ClassVar[str] = "reload"
    id: int
    name: str


@dataclass
class Ok:
    TYPE: ClassVar[str] = "ok"
    id: int


@dataclass
class Error:
    TYPE: ClassVar[str] = "error"
    id: int
    code: int
    name: str
    message: str
    fatal: bool
    # Protocol 5, written only when known (SPEC §6 "Error fields").
    input: str | None = field(default=None, metadata={"omit_none": True})
    item: int | None = field(default=None, metadata={"omit_none": True})
    limit: int | None = field(default=None, metadata={"omit_none": True})


@dataclass
class Goodbye:
    TYPE: ClassVar[str] = "goodbye"
    reason: str


@dataclass
class Stats:
    TYPE: ClassVar[str] = "stats"
    id: int


@dataclass
class ModelStat:
    """One model's scheduling counters since it was loaded (SPEC §2.4 model_stats)."""

    name: str
    version: int
    queued: int  # requests waiting now
    served: int
    failed: int
    rejected: int  # OVERLOADED at admission
    expired: int  # DEADLINE while queued
    batches: int
    batch_sizes: list[list[int]]  # [size, count] pairs, ascending size
    queue_us: int  # total time requests waited in the queue
    compute_us: int  # total forward-pass time of all batches
    max_queue_us: int
    # requests the model refused for their inputs (BAD_INPUT, BAD_REQUEST, TOO_LARGE): the
    # caller's error, not the model's. Added after version 4 shipped: written only when not
    # 0, and None (absent) means 0.
    bad_input: int | None = field(default=None, metadata={"omit_none": True})


@dataclass
class ModelStats:
    TYPE: ClassVar[str] = "model_stats"
    id: int
    models: list[ModelStat]


@dataclass
class Draining:
    TYPE: ClassVar[str] = "draining"
    grace_ms: int


@dataclass
class Health:
    TYPE: ClassVar[str] = "health"
    id: int


@dataclass
class ModelHealth:
    name: str
    version: int
    ready: bool  # False while a forward pass has run longer than stuck_after_s
    queued: int
    running_ms: int  # age of its oldest forward pass running now; 0 when none


@dataclass
class HealthReport:
    TYPE: ClassVar[str] = "health_report"
    id: int
    ready: bool
    draining: bool
    reason: str
    models: list[ModelHealth]


MESSAGE_TYPES: dict[str, type] = {
    cls.TYPE: cls
    for cls in (Hello, Welcome, Attached, Ready, Models, ModelList, Ping, Pong, Load, Unload,
                Reload, Ok, Error, Goodbye, Stats, ModelStats, Draining, Health, HealthReport)
}

Message = Any  # one of the dataclasses above


def encode_message(msg: Message) -> dict:
    return to_wire(msg)


def decode_message(value: dict) -> Message:
    """Decoded frame body -> message dataclass; BAD_MESSAGE when type or fields are wrong."""
    t = value.get("type")
    if not isinstance(t, str):
        raise ProtocolError("message has no string 'type' field", code=ErrorCode.BAD_MESSAGE)
    cls = MESSAGE_TYPES.get(t)
    if cls is None:
        raise ProtocolError(
            f"unknown message type {t!r}; this daemon speaks protocol {PROTOCOL_VERSION}",
            code=ErrorCode.BAD_MESSAGE,
        )
    try:
        msg = from_wire(cls, value, t)
    except WireTypeError as e:
        raise ProtocolError(str(e), code=ErrorCode.BAD_MESSAGE) from None
    _check_ranges(msg, t)
    return msg


U64 = 1 << 64


@functools.cache
def _int_fields(cls: type) -> tuple[tuple[str, int], ...]:
    """(field, lowest value) for each integer field of a message: the SPEC makes every one a
    uint, and every `id` positive (0 means "none" only in `error`)."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, 1 if f.name == "id" and cls is not Error else 0)
                 for f in dataclasses.fields(cls) if hints[f.name] in (int, int | None))


def _check_ranges(msg: Message, t: str) -> None:
    for name, low in _int_fields(type(msg)):
        v = getattr(msg, name)
        if v is not None and not low <= v < U64:
            what = "a positive integer" if low else "an unsigned integer"
            sign = "negative, " if v < 0 else ""
            raise ProtocolError(f"{t}.{name} is {v} ({sign}out of range): it must be {what} "
                                "below 2**64", code=ErrorCode.BAD_MESSAGE)


def error_message(err, request_id: int = 0, version: int = PROTOCOL_VERSION) -> Error:
    """The wire `error` for a TensordError; its input, item and limit from protocol 5 on."""
    e = Error(id=request_id, code=int(err.code), name=err.code.name, message=err.message,
              fatal=err.fatal)
    if version >= 5:
        e.input, e.item, e.limit = error_fields(err)
    return e


def error_fields(err) -> tuple[str | None, int | None, int | None]:
    """A TensordError's input, item and limit, each None unless it is a valid wire value."""
    def uint(v):
        return v if type(v) is int and 0 <= v < U64 else None
    name = getattr(err, "input", None)
    return (name if isinstance(name, str) else None, uint(getattr(err, "item", None)),
            uint(getattr(err, "limit", None)))


def for_version(info: ModelInfo, version: int) -> ModelInfo:
    """Model info as a session of `version` is sent it: protocol 4 has no `idempotent`."""
    if version >= 5:
        return info
    return dataclasses.replace(info, idempotent=None)
