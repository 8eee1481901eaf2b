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

# -- the serving core (daemon/native/src/engine; serving/core.py and worker.py drive it) ---

class Engine:
    """The serving core: one dispatcher thread over every session, per-model queues, batches.
    Per request nothing runs in Python."""

    def __init__(self, spin_us: int, max_memory: int, max_memory_per_uid: int) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None:
        """Stops the dispatcher (GIL released while it joins) and retires every model."""
    def alive(self) -> bool: ...
    @property
    def events_fd(self) -> int:
        """Readable when take_events() has something."""
    def take_events(self) -> list[tuple[str, int, int, str]]:
        """[("fatal", session, code, message) | ("freed", session, 0, "")]."""
    def add_session(self, name: str, memfd: int, request_ring: int, response_ring: int,
                    efds: tuple[int, int, int, int], uid: int, high_priority: bool,
                    park_limit: int) -> int:
        """Maps the memfd itself, owns the eventfds (pass duplicates); the session's id."""
    def set_session_version(self, id: int, version: int) -> None:
        """The session's protocol version: below 5 its error responses carry no fields."""
    def end_session(self, id: int) -> None: ...
    def session_idle(self, id: int) -> bool: ...
    def session_served(self, id: int) -> int: ...
    def sessions(self) -> int: ...
    def parked(self, uid: int) -> tuple[int, int]:
        """(parked response bytes of uid, in all)."""
    def longest_pass(self) -> float:
        """Seconds: the longest the dispatcher spent on one session's records in one pass
        since start (every other session's intake waited that long)."""
    def set_model(self, name: str, version: int,
                  inputs: list[tuple[str, str, list[int] | None]], max_batch: int,
                  max_input_bytes: int, max_batch_size: int, max_queue_delay_us: int,
                  preferred_batch_sizes: list[int], max_queue: int, max_batch_bytes: int,
                  batching: bool, identity: bool,
                  compute_bound: tuple[int, str] = (0, "")) -> ModelQueue:
        """Serves a model under its name (the version it replaces drains). compute_bound:
        the most input bytes per request the daemon's compute memory admits (0: any) and
        why, for the TOO_LARGE message."""
    def remove_model(self, name: str) -> None: ...
    def metrics(self) -> list[tuple[str, list[tuple[str, int]],
                                    list[tuple[list[int], float]], int]]:
        """Per model: (name, [(outcome, requests)], [request, queue, compute, batch-size
        histograms as (per-bucket counts, sum)], batch retries)."""
    def cancel_queued(self, code: int, message: str) -> int: ...

class ModelQueue:
    """One model's queue in the core; its workers take batches from it."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def length(self) -> int: ...
    def next_batch(self) -> Batch | None:
        """Blocks (GIL released) for the next batch; None once retired and drained."""
    def stats(self) -> tuple[int, int, int, int, int, int, list[tuple[int, int]], int, int,
                             int, int]:
        """(served, failed, bad_input, rejected, expired, batches, [(size, count)],
        queue_us, compute_us, max_queue_us, retried)."""
    def running_for(self) -> float: ...
    def retire(self) -> None: ...

class Arena:
    """One input's bytes for every request of a batch (buffer protocol, writable)."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

class Batch:
    """Requests a worker took; answered once each by complete/complete_one/fail."""

    def __len__(self) -> int: ...
    @property
    def rows(self) -> list[int]: ...
    @property
    def model(self) -> str: ...
    def inputs(self) -> list[tuple[Arena, str, list[tuple[int, int, list[int]]]]]:
        """Per input: (arena, dtype, [(offset, nbytes, shape) per request])."""
    def ages(self) -> list[tuple[float, float]]: ...
    def complete(self, lo: int, hi: int,
                 outputs: list[tuple[str, str, list[int], Buffer]]) -> None:
        """Requests [lo, hi) get their rows of the outputs; ValueError if the rows differ."""
    def complete_one(self, k: int, outputs: list[tuple[str, str, list[int], Buffer]]) -> None: ...
    def fail(self, lo: int, hi: int, code: int, message: str, input: str | None = None,
             item: int | None = None, limit: int | None = None) -> None: ...
    def open(self) -> list[int]: ...
    def retried(self) -> None: ...
    def close(self) -> None: ...
