"""Control-channel messages of SPEC §2.4, one dataclass each, fields in canonical order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .codec import WireTypeError, from_wire, to_wire
from .errors import ErrorCode, ProtocolError

# Version 3: wake-ups are eventfds that ride with the segment's memfd on the welcome frame
# (SCM_RIGHTS); `welcome` lost its `semaphores` field (SPEC §9).
PROTOCOL_VERSION = 3
SUPPORTED_VERSIONS = (3,)


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int] | None


@dataclass
class ModelInfo:
    name: str
    version: int
    device: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclass
class Hello:
    TYPE: ClassVar[str] = "hello"
    min_version: int
    max_version: int
    client: str
    request_ring: int
    response_ring: int


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


@dataclass
class Goodbye:
    TYPE: ClassVar[str] = "goodbye"
    reason: str


MESSAGE_TYPES: dict[str, type] = {
    cls.TYPE: cls
    for cls in (Hello, Welcome, Attached, Ready, Models, ModelList, Ping, Pong, Load, Unload,
                Reload, Ok, Error, Goodbye)
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
        return from_wire(cls, value, t)
    except WireTypeError as e:
        raise ProtocolError(str(e), code=ErrorCode.BAD_MESSAGE) from None


def error_message(err, request_id: int = 0) -> Error:
    """The wire `error` for a TensordError."""
    return Error(id=request_id, code=int(err.code), name=err.code.name, message=err.message,
                 fatal=err.fatal)
