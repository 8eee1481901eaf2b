"""Error codes of SPEC §6 and the exception hierarchy built on them."""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    BAD_FRAME = 1
    VERSION = 2
    BAD_MESSAGE = 3
    UNKNOWN_MODEL = 4
    BAD_INPUT = 5
    TOO_LARGE = 6
    RESOURCE = 7
    PERMISSION = 8
    MODEL_FAILED = 9
    BAD_RECORD = 10
    BAD_REQUEST = 11
    DEADLINE = 12
    OVERLOADED = 13
    SHUTTING_DOWN = 14
    UNSUPPORTED = 15
    INTERNAL = 16


# SPEC §6 "ran? no": the daemon guarantees the model did not run for a request answered so.
# (TOO_LARGE may have: a response too large for the ring, or to hold, is refused after the run.)
# BAD_INPUT did not: the daemon and a model's input checks find it before computing anything.
NOT_RUN = frozenset({1, 2, 3, 4, 5, 7, 8, 11, 12, 13, 14, 15})
# SPEC §6 "worth retrying", a property of the code wherever the error was found: the same
# request may succeed later, unchanged (the daemon was busy, stopping or short of memory).
# Every other code fails again until something changes.
TRANSIENT = frozenset({ErrorCode.RESOURCE, ErrorCode.OVERLOADED, ErrorCode.SHUTTING_DOWN})


class TensordError(Exception):
    """An error with a protocol code. `fatal` means the connection ends with it. `ran` is
    False when the request certainly did not run (safe to retry), None when it may have.

    `input`, `item` and `limit` (protocol 5, SPEC §6 "Error fields") say what the error is
    about when it is about one input: its name, the index of the item (image, text) in it,
    and the limit it went past; None when the error does not say."""

    code: ErrorCode = ErrorCode.INTERNAL
    # Set by the raiser where they apply, read with getattr: a refusal's label in metrics,
    # the request and the model an error belongs to.
    reason: str
    request_id: int
    model: str

    def __init__(self, message: str, *, code: ErrorCode | None = None, fatal: bool = False,
                 ran: bool | None = ...,  # type: ignore[assignment]
                 input: str | None = None, item: int | None = None, limit: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.fatal = fatal
        self.ran = (False if int(self.code) in NOT_RUN else None) if ran is ... else ran
        self.input = input
        self.item = item
        self.limit = limit

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def safe_to_retry(err: BaseException) -> bool:
    """Whether a failed call certainly did not run, so retrying it cannot run it twice."""
    return isinstance(err, TensordError) and err.ran is False


def retryable(err: BaseException) -> bool:
    """Whether the same call is worth making again later: it certainly did not run and its
    error is transient (SPEC §6: RESOURCE, OVERLOADED, SHUTTING_DOWN, or the connection
    ended before it was sent). Bad input, unknown models and the like never are."""
    return safe_to_retry(err) and err.code in TRANSIENT  # type: ignore[attr-defined]


class ProtocolError(TensordError):
    """The peer broke the wire contract (BAD_FRAME, BAD_MESSAGE, BAD_RECORD)."""

    code = ErrorCode.BAD_MESSAGE


class VersionError(TensordError):
    code = ErrorCode.VERSION


class UnknownModelError(TensordError):
    code = ErrorCode.UNKNOWN_MODEL


class BadInputError(TensordError):
    code = ErrorCode.BAD_INPUT


class TooLargeError(TensordError):
    code = ErrorCode.TOO_LARGE


class ResourceError(TensordError):
    code = ErrorCode.RESOURCE


class PermissionDeniedError(TensordError):
    code = ErrorCode.PERMISSION


class ModelFailedError(TensordError):
    code = ErrorCode.MODEL_FAILED


class BadRequestError(TensordError):
    code = ErrorCode.BAD_REQUEST


class DeadlineError(TensordError):
    code = ErrorCode.DEADLINE


class OverloadedError(TensordError):
    code = ErrorCode.OVERLOADED


class ShuttingDownError(TensordError):
    code = ErrorCode.SHUTTING_DOWN


class UnsupportedError(TensordError):
    code = ErrorCode.UNSUPPORTED


class InternalError(TensordError):
    code = ErrorCode.INTERNAL


class ConnectionClosedError(TensordError):
    """Client side: the daemon closed the connection or died."""

    code = ErrorCode.SHUTTING_DOWN


_BY_CODE: dict[ErrorCode, type[TensordError]] = {
    ErrorCode.BAD_FRAME: ProtocolError,
    ErrorCode.BAD_MESSAGE: ProtocolError,
    ErrorCode.BAD_RECORD: ProtocolError,
    ErrorCode.VERSION: VersionError,
    ErrorCode.UNKNOWN_MODEL: UnknownModelError,
    ErrorCode.BAD_INPUT: BadInputError,
    ErrorCode.TOO_LARGE: TooLargeError,
    ErrorCode.RESOURCE: ResourceError,
    ErrorCode.PERMISSION: PermissionDeniedError,
    ErrorCode.MODEL_FAILED: ModelFailedError,
    ErrorCode.BAD_REQUEST: BadRequestError,
    ErrorCode.DEADLINE: DeadlineError,
    ErrorCode.OVERLOADED: OverloadedError,
    ErrorCode.SHUTTING_DOWN: ShuttingDownError,
    ErrorCode.UNSUPPORTED: UnsupportedError,
    ErrorCode.INTERNAL: InternalError,
}


def error_from_code(code: int, message: str, *, fatal: bool = False, input: str | None = None,
                    item: int | None = None, limit: int | None = None) -> TensordError:
    """Build the exception a peer's error code stands for (unknown codes become INTERNAL)."""
    try:
        ec = ErrorCode(code)
    except ValueError:
        return InternalError(f"unknown error code {code}: {message}", fatal=fatal,
                             input=input, item=item, limit=limit)
    return _BY_CODE[ec](message, code=ec, fatal=fatal, input=input, item=item, limit=limit)
