"""tensord's native core (the Rust crate in daemon/native): shared-memory rings, wake-ups and
request intake. Offsets are byte offsets into the Shm's mapping unless said otherwise; every
one is checked against the mapping (ValueError) before any byte is touched."""

from typing_extensions import Buffer

class CorruptError(ValueError):
    """The producer of a ring broke SPEC §4.2/§4.8: the session must end (BAD_RECORD)."""

class RequestError(ValueError):
    """A request refused before it ran."""

    code: int  # the SPEC §6 error code (BAD_REQUEST, BAD_INPUT, TOO_LARGE, ...)
    message: str

# -- shared memory and rings ------------------------------------------------------------------

class Shm:
    """A writable, 64-byte aligned mapping with atomic accessors, copies and wake-ups."""

    def __init__(self, buffer: Buffer, /) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def size(self) -> int: ...
    def close(self) -> None:
        """Release the mapping (idempotent); later calls raise ValueError."""
    def load64(self, off: int, /) -> int:
        """Acquire-load a u64."""
    def store64(self, off: int, value: int, /) -> None:
        """Release-store a u64."""
    def load32(self, off: int, /) -> int:
        """Acquire-load a u32."""
    def store32(self, off: int, value: int, /) -> None:
        """Release-store a u32, then a full fence."""
    def notify(self, flag_off: int, efd: int, /) -> bool:
        """Fence, then post `efd` if the u32 at flag_off is set (GIL released for the post)."""
    def post(self, efd: int, /) -> None:
        """Post an eventfd unconditionally (errors ignored: a wake-up is a hint)."""
    def wait(self, counter_off: int, seen: int, flag_off: int, efd: int, spin_ns: int,
             timeout_ns: int, /) -> bool:
        """Without the GIL: spin, then set the flag and block on `efd` until the u64 at
        counter_off differs from `seen` (True) or timeout_ns passes (False; < 0: no timeout)."""
    def copy_in(self, off: int, src: Buffer, /) -> None:
        """Copy a buffer into the mapping (without the GIL from 64 KiB)."""
    def copy_out(self, off: int, n: int, /) -> bytes: ...
    def write_record(self, off: int, kind: int, request_id: int, record_len: int,
                     descriptor: Buffer, /) -> None:
        """A record's 24-byte header and its descriptor."""
    def read_header(self, off: int, /) -> tuple[int, int, int, int]:
        """(record_len, kind, request_id, desc_len), unvalidated."""
    def fence(self) -> None: ...

class Consumer:
    """The consumer of one ring: validated reads, out-of-order release (SPEC §4.7)."""

    def __init__(self, shm: Shm, ctl: int, ring: int, capacity: int, kind: int, /) -> None: ...
    def poll(self, limit: int, /) -> list[tuple[int, int, int, int, int]]:
        """[(position, offset, request_id, desc_len, record_len)] of records of `kind`
        published since the last poll; at most `limit` records read (PADs count). Raises
        CorruptError."""
    def release(self, position: int, /) -> bool:
        """Mark a record done; True when head moved. KeyError when it is not held."""
    def published(self) -> bool:
        """Whether unread records exist."""
    @property
    def read(self) -> int: ...
    @property
    def head(self) -> int: ...
    @property
    def held(self) -> int: ...
    @property
    def capacity(self) -> int: ...

class Producer:
    """The producer of one ring: reserve, fill, publish."""

    def __init__(self, shm: Shm, ctl: int, ring: int, capacity: int, /) -> None: ...
    def reserve(self, record_len: int, /) -> int:
        """The record's offset, or -1 while there is no space (a PAD goes first when the record
        would cross the buffer's end)."""
    def fits(self, record_len: int, /) -> bool: ...
    def publish(self) -> None:
        """Release-store tail."""
    @property
    def tail(self) -> int: ...
    @property
    def head(self) -> int: ...
    @property
    def capacity(self) -> int: ...

def spin_any(consumers: tuple[Consumer, ...], spin_ns: int, /) -> int:
    """Index of the first consumer with unread records, or -1 after spin_ns (GIL released)."""

# -- request intake and response descriptors --------------------------------------------------

TensorRef = tuple[str, str, list[int], int, int]  # (name, dtype, shape, offset, nbytes)

def decode_request(descriptor: Buffer, data_start: int, record_len: int,
                   /) -> tuple[str, int, int, list[TensorRef]]:
    """(model, timeout_us, priority, inputs): every check of contract/descriptors.py's
    decode_request + check_refs, with the same codes; raises RequestError."""

def encode_response_outputs(outputs: list[TensorRef], /) -> bytes:
    """{"outputs": [...]} in canonical msgpack (byte-identical to the Python encoder)."""

def encode_response_error(code: int, name: str, message: str, /) -> bytes:
    """{"error": {"code", "name", "message"}} in canonical msgpack."""

def plan_outputs(outputs: list[tuple[str, str, list[int], int]],
                 /) -> tuple[int, bytes, list[int]]:
    """(record_len, descriptor, offsets) for outputs of (name, dtype, shape, nbytes): the
    layout transport/records.py plan() chooses."""

def byte_strings(data: Buffer, count: int, name: str, /) -> bytes:
    """count + 1 little-endian u64 offsets into `data` (string i is data[o[i]:o[i + 1]]) after
    checking the length table against len(data); raises RequestError (BAD_INPUT)."""

def check_bools(data: Buffer, name: str, /) -> None:
    """RequestError (BAD_INPUT) when a byte is not 0 or 1."""

class Signature:
    """A model's compiled input signature: names -> positions, dtypes ("any" allowed), fixed
    dims (-1: any size; None: any rank), max rows per request, max input bytes."""

    def __init__(self, model: str, inputs: list[tuple[str, str, list[int] | None]],
                 max_batch: int = 0, max_input_bytes: int = 0) -> None: ...
    @property
    def model(self) -> str: ...
    def order(self, refs: list[TensorRef], /) -> list[int]:
        """Indexes of `refs` in the model's input order; raises RequestError (BAD_INPUT,
        TOO_LARGE) as models/signature.py order_inputs and the session's byte limit do."""
    def intake(self, descriptor: Buffer, data_start: int, record_len: int,
               /) -> tuple[str, int, int, list[TensorRef]]:
        """decode_request, then order, in one call; inputs in the model's order."""
