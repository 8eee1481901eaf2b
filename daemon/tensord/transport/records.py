"""Laying out and filling one record: header, descriptor, 64-byte aligned tensor bytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..contract.descriptors import align64
from ..contract.dtypes import ByteStrings
from ..contract.layout import RECORD_HEADER, RECORD_HEADER_SIZE

if TYPE_CHECKING:
    from .segment import Segment


def plan(sizes: list[int], encode: Callable[[list[int]], bytes]) -> tuple[int, bytes, list[int]]:
    """Choose tensor offsets for payloads of `sizes` bytes.

    `encode(offsets)` returns the descriptor naming those offsets. Its length depends on the
    offsets (msgpack writes small numbers shorter), so the data area start moves up until the
    descriptor fits in front of it. Returns (record_len, descriptor, offsets)."""
    start = align64(RECORD_HEADER_SIZE + 32 * len(sizes) + 16)
    while True:
        offsets, cur = [], start
        for n in sizes:
            offsets.append(cur)
            cur = align64(cur + n)
        desc = encode(offsets)
        if RECORD_HEADER_SIZE + len(desc) <= start:
            return max(cur, align64(RECORD_HEADER_SIZE + len(desc))), desc, offsets
        start = align64(RECORD_HEADER_SIZE + len(desc))


def write(seg: Segment, off: int, kind: int, request_id: int, record_len: int, desc: bytes,
          payloads: list[tuple[int, int, torch.Tensor | ByteStrings]]) -> None:
    """Fill the record at segment offset `off`; payloads are (offset, nbytes, value)."""
    seg.shm.write_record(off, kind, request_id, record_len, desc)
    buf = seg.buf
    for rel, n, v in payloads:
        if n == 0:
            continue
        o = off + rel
        if isinstance(v, ByteStrings):
            v.encode_into(buf[o:o + n])
        elif v.is_cuda:
            dst = torch.frombuffer(buf, dtype=torch.uint8, count=n, offset=o)
            # An async D2H copy straight into the ring: the caller synchronizes before publishing.
            dst.copy_(v.reshape(-1).view(torch.uint8), non_blocking=True)
            del dst
        else:
            # A plain memcpy (without the GIL when large); cheaper than a torch view + copy_.
            seg.shm.copy_in(o, v.reshape(-1).view(torch.uint8).numpy())


def render(kind: int, request_id: int, record_len: int, desc: bytes,
           payloads: list[tuple[int, int, torch.Tensor | ByteStrings]]) -> bytearray:
    """The whole record as bytes the caller owns (a parked response): header, descriptor and
    a copy of every payload, so nothing in it views memory another party may reuse (a request
    record, a device buffer). One allocation: large ones are mmap'ed and go back to the OS."""
    out = bytearray(record_len)
    RECORD_HEADER.pack_into(out, 0, record_len, kind, request_id, len(desc), 0)
    out[RECORD_HEADER_SIZE:RECORD_HEADER_SIZE + len(desc)] = desc
    mv = memoryview(out)
    for rel, n, v in payloads:
        if n == 0:
            continue
        if isinstance(v, ByteStrings):
            v.encode_into(mv[rel:rel + n])
        else:
            src = v.reshape(-1).view(torch.uint8)
            if src.is_cuda:
                src = src.cpu()
            mv[rel:rel + n] = src.numpy().data
    return out


def nbytes(v: torch.Tensor | ByteStrings) -> int:
    return v.encoded_size() if isinstance(v, ByteStrings) else v.numel() * v.element_size()


def read_tensor(buf: memoryview, off: int, dtype: torch.dtype, itemsize: int, n: int,
                shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor viewing `n` bytes of shared memory at `off` (no copy)."""
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=n // itemsize, offset=off).view(shape)
