"""Byte layout of the session segment and ring records (SPEC §4.1–§4.3)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"TENSORD\0"
LAYOUT_VERSION = 1
HEADER_SIZE = 4096
MIN_RING = 65536

# Segment header offsets.
OFF_MAGIC = 0
OFF_LAYOUT_VERSION = 8
OFF_HEADER_SIZE = 12
OFF_SEGMENT_SIZE = 16
OFF_REQ_OFFSET = 24
OFF_REQ_CAPACITY = 32
OFF_RESP_OFFSET = 40
OFF_RESP_CAPACITY = 48
REQ_CONTROL = 128
RESP_CONTROL = 256

# Offsets inside a ring control block: two cache lines, one writer each.
CTL_TAIL = 0
CTL_PRODUCER_WAITING = 8
CTL_HEAD = 64
CTL_CONSUMER_WAITING = 72

KIND_PAD = 0
KIND_REQUEST = 1
KIND_RESPONSE = 2

RECORD_HEADER = struct.Struct("<IIQII")
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 24
assert RECORD_HEADER_SIZE == 24


@dataclass(frozen=True)
class RecordHeader:
    record_len: int
    kind: int
    request_id: int
    desc_len: int

    def pack(self) -> bytes:
        return RECORD_HEADER.pack(self.record_len, self.kind, self.request_id, self.desc_len, 0)

    def pack_into(self, buf, offset: int) -> None:
        RECORD_HEADER.pack_into(buf, offset, self.record_len, self.kind, self.request_id,
                                self.desc_len, 0)

    @classmethod
    def unpack_from(cls, buf, offset: int = 0) -> RecordHeader:
        n, kind, rid, dlen, _ = RECORD_HEADER.unpack_from(buf, offset)
        return cls(n, kind, rid, dlen)


def segment_size(request_ring: int, response_ring: int) -> int:
    return HEADER_SIZE + request_ring + response_ring


def ring_capacity(wanted: int, default: int) -> int:
    """Round a wanted ring size up to a power of two of at least MIN_RING (0 = default)."""
    n = wanted or default
    cap = MIN_RING
    while cap < n:
        cap <<= 1
    return cap


def write_header(buf: memoryview, request_ring: int, response_ring: int) -> None:
    """Write the segment header; layout_version goes last so openers never see half of it."""
    size = segment_size(request_ring, response_ring)
    buf[0:HEADER_SIZE] = bytes(HEADER_SIZE)
    buf[OFF_MAGIC:OFF_MAGIC + 8] = MAGIC
    struct.pack_into("<I", buf, OFF_HEADER_SIZE, HEADER_SIZE)
    struct.pack_into("<QQQQQ", buf, OFF_SEGMENT_SIZE, size, HEADER_SIZE, request_ring,
                     HEADER_SIZE + request_ring, response_ring)
    struct.pack_into("<I", buf, OFF_LAYOUT_VERSION, LAYOUT_VERSION)


@dataclass(frozen=True)
class SegmentHeader:
    layout_version: int
    header_size: int
    segment_size: int
    request_ring_offset: int
    request_ring_capacity: int
    response_ring_offset: int
    response_ring_capacity: int


def read_header(buf: memoryview) -> SegmentHeader:
    if bytes(buf[0:8]) != MAGIC:
        raise ValueError(f"segment magic is {bytes(buf[0:8])!r}, expected {MAGIC!r}")
    (ver, hsize) = struct.unpack_from("<II", buf, OFF_LAYOUT_VERSION)
    vals = struct.unpack_from("<QQQQQ", buf, OFF_SEGMENT_SIZE)
    return SegmentHeader(ver, hsize, *vals)
