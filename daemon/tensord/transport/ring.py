"""Single-producer/single-consumer byte rings over shared memory (SPEC §4.2–§4.7).

The work is done by the native core (`tensord._core`, the Rust crate in daemon/native):
acquire/release counters, record-header validation and the out-of-order release list. These
classes give it the daemon's error type and records with names."""

from __future__ import annotations

from .. import _core
from ..contract.errors import ErrorCode, ProtocolError
from ..contract.layout import (
    CTL_CONSUMER_WAITING,
    CTL_HEAD,
    CTL_PRODUCER_WAITING,
    CTL_TAIL,
    RECORD_HEADER_SIZE,
)

Shm = _core.Shm


class RingControl:
    """One ring's control block (SPEC §4.2): byte offsets of its words in the segment, and
    atomic access to them."""

    def __init__(self, shm: Shm, base: int):
        self.shm = shm
        self.tail_at = base + CTL_TAIL
        self.head_at = base + CTL_HEAD
        self.producer_waiting = base + CTL_PRODUCER_WAITING
        self.consumer_waiting = base + CTL_CONSUMER_WAITING

    def tail(self) -> int:
        return self.shm.load64(self.tail_at)

    def set_tail(self, v: int) -> None:
        self.shm.store64(self.tail_at, v)

    def head(self) -> int:
        return self.shm.load64(self.head_at)

    def set_head(self, v: int) -> None:
        self.shm.store64(self.head_at, v)

    def flag(self, at: int) -> int:
        return self.shm.load32(at)

    def set_flag(self, at: int, v: int) -> None:
        self.shm.store32(at, v)


class Record:
    """A record read from a ring: where it is and its validated header fields."""

    __slots__ = ("position", "offset", "request_id", "desc_len", "record_len")

    def __init__(self, position: int, offset: int, request_id: int, desc_len: int,
                 record_len: int):
        self.position = position  # free-running ring position
        self.offset = offset  # of the record in the segment
        self.request_id = request_id
        self.desc_len = desc_len
        self.record_len = record_len

    @property
    def data_start(self) -> int:
        """Lowest offset (from the record start) tensor bytes may use."""
        return (RECORD_HEADER_SIZE + self.desc_len + 63) & ~63


class RingConsumer:
    """Reads published records, validating every header, and releases them out of order
    (SPEC §4.7): `head` moves over the longest prefix of released records."""

    def __init__(self, ctl: RingControl, offset: int, capacity: int, expect_kind: int):
        self.ctl = ctl
        self.capacity = capacity
        self.core = _core.Consumer(ctl.shm, ctl.tail_at, offset, capacity, expect_kind)
        self.published = self.core.published

    @property
    def read(self) -> int:
        """Ring position read up to (what a waiter for new records has seen)."""
        return self.core.read

    def poll(self, limit: int = 1 << 30) -> list[Record]:
        """Records published since the last poll, at most `limit` records (PADs count, so a
        ring of PADs costs bounded work per call). Raises ProtocolError(BAD_RECORD) when the
        producer broke §4.2/§4.8."""
        try:
            raw = self.core.poll(limit)
        except _core.CorruptError as e:
            raise ProtocolError(str(e), code=ErrorCode.BAD_RECORD, fatal=True) from None
        return [Record(*t) for t in raw]

    def release(self, record: Record) -> bool:
        """Mark a record done; returns True when `head` moved (space was freed)."""
        return self.core.release(record.position)


class RingProducer:
    """Writes records and publishes them by storing `tail` after their bytes (SPEC §4.6)."""

    def __init__(self, ctl: RingControl, offset: int, capacity: int):
        self.ctl = ctl
        self.capacity = capacity
        self.core = _core.Producer(ctl.shm, ctl.tail_at, offset, capacity)
        self.fits = self.core.fits
        self.publish = self.core.publish

    def try_reserve(self, record_len: int) -> int | None:
        """Claim `record_len` bytes (a multiple of 64, at most the capacity); returns the record's
        offset in the segment, or None while the consumer has not released enough space. A PAD
        fills the rest of the buffer first when the record would not fit before its end."""
        off = self.core.reserve(record_len)
        return None if off < 0 else off

    def head(self) -> int:
        """The consumer's `head` (what a waiter for space has seen)."""
        return self.core.head


__all__ = ["Shm", "RingControl", "RingProducer", "RingConsumer", "Record"]
