"""Single-producer/single-consumer byte rings over shared memory (SPEC §4.2–§4.7)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..contract.errors import ErrorCode, ProtocolError
from ..contract.layout import (
    CTL_CONSUMER_WAITING,
    CTL_HEAD,
    CTL_PRODUCER_WAITING,
    CTL_TAIL,
    KIND_PAD,
    RECORD_HEADER_SIZE,
    RecordHeader,
)


class RingControl:
    """One ring's control block. Counters are read and written as single aligned 8-byte
    (4-byte) accesses through `cast` views, which CPython performs as one load or store."""

    def __init__(self, header: memoryview, base: int):
        self._q = header.cast("Q")
        self._i = header.cast("I")
        self._tail = (base + CTL_TAIL) // 8
        self._head = (base + CTL_HEAD) // 8
        self.producer_waiting = (base + CTL_PRODUCER_WAITING) // 4
        self.consumer_waiting = (base + CTL_CONSUMER_WAITING) // 4

    def tail(self) -> int:
        return self._q[self._tail]

    def set_tail(self, v: int) -> None:
        self._q[self._tail] = v

    def head(self) -> int:
        return self._q[self._head]

    def set_head(self, v: int) -> None:
        self._q[self._head] = v

    def flag(self, index: int) -> int:
        return self._i[index]

    def set_flag(self, index: int, v: int) -> None:
        self._i[index] = v

    def release(self) -> None:
        self._q.release()
        self._i.release()


class RingProducer:
    """Writes records and publishes them by storing `tail` after their bytes (SPEC §4.6)."""

    def __init__(self, ctl: RingControl, offset: int, capacity: int, segment: memoryview):
        self.ctl = ctl
        self.offset = offset
        self.capacity = capacity
        self.buf = segment
        self._tail = ctl.tail()

    def try_reserve(self, record_len: int) -> int | None:
        """Claim `record_len` bytes (a multiple of 64, at most the capacity); returns the record's
        offset in the segment, or None while the consumer has not released enough space. A PAD
        fills the rest of the buffer first when the record would not fit before its end."""
        if not self.fits(record_len):
            return None
        cap = self.capacity
        idx = self._tail & (cap - 1)
        rest = cap - idx
        if record_len > rest:
            RecordHeader(rest, KIND_PAD, 0, 0).pack_into(self.buf, self.offset + idx)
            self._tail += rest
            idx = 0
        self._tail += record_len
        return self.offset + idx

    def fits(self, record_len: int) -> bool:
        """Whether `try_reserve(record_len)` would succeed now."""
        cap = self.capacity
        rest = cap - (self._tail & (cap - 1))
        need = record_len if record_len <= rest else rest + record_len
        return self._tail + need - self.ctl.head() <= cap

    def publish(self) -> None:
        self.ctl.set_tail(self._tail)


@dataclass
class Record:
    position: int  # free-running ring position
    offset: int  # offset of the record in the segment
    header: RecordHeader

    @property
    def data_start(self) -> int:
        """Lowest offset (from the record start) tensor bytes may use."""
        return (RECORD_HEADER_SIZE + self.header.desc_len + 63) & ~63


class RingConsumer:
    """Reads published records, validating every header, and releases them out of order
    (SPEC §4.7): `head` moves over the longest prefix of released records."""

    def __init__(self, ctl: RingControl, offset: int, capacity: int, segment: memoryview,
                 expect_kind: int):
        self.ctl = ctl
        self.offset = offset
        self.capacity = capacity
        self.buf = segment
        self.expect_kind = expect_kind
        self._read = ctl.head()
        self._head = self._read
        self._tail_seen = self._read  # tail may never go below a value already seen (§4.2)
        self._held: deque[list] = deque()  # [position, length, released]

    def published(self) -> bool:
        return self.ctl.tail() != self._read

    def poll(self, limit: int = 1 << 30) -> list[Record]:
        """Records published since the last poll, at most `limit` of them (the rest wait for
        the next poll). PADs are released at once and not returned. Raises
        ProtocolError(BAD_RECORD) when the producer broke §4.2/§4.8."""
        tail = self.ctl.tail()
        cap = self.capacity
        if tail < self._tail_seen or tail > self._head + cap or tail % 64:
            raise _corrupt(f"ring tail {tail} is impossible (seen up to {self._tail_seen}, "
                           f"head {self._head}, capacity {cap})")
        self._tail_seen = tail
        out: list[Record] = []
        while self._read < tail and len(out) < limit:
            idx = self._read & (cap - 1)
            h = RecordHeader.unpack_from(self.buf, self.offset + idx)
            n = h.record_len
            if n < 64 or n % 64 or self._read + n > tail or idx + n > cap:
                raise _corrupt(f"record at ring position {self._read} has length {n} "
                               f"(published up to {tail}, capacity {cap})")
            if h.kind == KIND_PAD:
                self._held.append([self._read, n, True])
            elif h.kind == self.expect_kind:
                if h.desc_len > n - RECORD_HEADER_SIZE:
                    raise _corrupt(f"record {h.request_id}: descriptor length {h.desc_len} "
                                   f"exceeds its record length {n}")
                self._held.append([self._read, n, False])
                out.append(Record(self._read, self.offset + idx, h))
            else:
                raise _corrupt(f"record at ring position {self._read} has kind {h.kind}")
            self._read += n
        self._advance()
        return out

    def release(self, record: Record) -> bool:
        """Mark a record done; returns True when `head` moved (space was freed)."""
        for entry in self._held:
            if entry[0] == record.position:
                entry[2] = True
                break
        else:
            raise KeyError(f"record at {record.position} is not held")
        return self._advance()

    def _advance(self) -> bool:
        moved = False
        while self._held and self._held[0][2]:
            pos, n, _ = self._held.popleft()
            self._head = pos + n
            moved = True
        if moved:
            self.ctl.set_head(self._head)
        return moved


def _corrupt(msg: str) -> ProtocolError:
    return ProtocolError(msg, code=ErrorCode.BAD_RECORD, fatal=True)


__all__ = ["RingControl", "RingProducer", "RingConsumer", "Record"]
