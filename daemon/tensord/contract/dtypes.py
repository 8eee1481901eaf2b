"""Dtypes of SPEC §5: wire names, sizes, torch equivalents, and the `bytes` encoding."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import BadInputError


@dataclass(frozen=True)
class DType:
    name: str
    itemsize: int  # 0 for the variable-length `bytes` dtype
    torch_dtype: torch.dtype | None


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("f16", 2, torch.float16),
        DType("bf16", 2, torch.bfloat16),
        DType("f32", 4, torch.float32),
        DType("f64", 8, torch.float64),
        DType("i8", 1, torch.int8),
        DType("i16", 2, torch.int16),
        DType("i32", 4, torch.int32),
        DType("i64", 8, torch.int64),
        DType("u8", 1, torch.uint8),
        DType("bool", 1, torch.bool),
        DType("bytes", 0, None),
    )
}

ANY = "any"  # only in model signatures: the model takes every dtype

_BY_TORCH = {d.torch_dtype: d for d in DTYPES.values() if d.torch_dtype is not None}


def lookup(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise BadInputError(
            f"unknown dtype {name!r}; the protocol knows {', '.join(DTYPES)}"
        ) from None


def from_torch(dtype: torch.dtype) -> DType:
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise BadInputError(f"torch dtype {dtype} has no wire dtype") from None


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class ByteStrings:
    """A tensor of the `bytes` dtype: numel(shape) byte strings in row-major order.

    Kept in its wire form (SPEC §5: a u32 length table, then the strings back to back) as one
    bytes object, so a request of millions of short strings costs its own size in memory, not
    one Python object per string; `items` makes the list only when a model asks for it (a
    handler that decodes images or text does; `identity` and the batcher never do)."""

    __slots__ = ("shape", "_items", "_data")

    def __init__(self, items: list[bytes], shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self._items: list[bytes] | None = list(items)
        self._data: bytes | None = None

    @classmethod
    def from_encoded(cls, data: bytes, shape: tuple[int, ...]) -> ByteStrings:
        """From SPEC §5's encoding, already checked (decode_byte_strings)."""
        v = cls.__new__(cls)
        v.shape, v._items, v._data = tuple(shape), None, data
        return v

    @property
    def items(self) -> list[bytes]:
        if self._items is None:
            data = self._data
            assert data is not None
            n = numel(self.shape)
            ends = 4 * n + np.cumsum(np.frombuffer(data, "<u4", n), dtype=np.int64)
            starts = np.concatenate(([4 * n], ends[:-1])) if n else ends
            self._items = [data[a:b] for a, b in zip(starts.tolist(), ends.tolist())]
        return self._items

    def __len__(self) -> int:
        """The number of strings (without making them)."""
        return numel(self.shape)

    def all_bytes(self) -> bool:
        """Every item is a bytes object (always so for the wire form)."""
        return self._items is None or all(isinstance(b, bytes) for b in self._items)

    def lengths(self) -> np.ndarray:
        if self._items is None:
            assert self._data is not None
            return np.frombuffer(self._data, "<u4", numel(self.shape))
        return np.fromiter((len(b) for b in self._items), np.uint32, len(self._items))

    def encoded_size(self) -> int:
        if self._data is not None:
            return len(self._data)
        return 4 * len(self._items) + sum(len(b) for b in self._items)

    def encode_into(self, buf: memoryview) -> None:
        if self._data is not None:
            buf[:len(self._data)] = self._data
            return
        n = len(self._items)
        struct.pack_into(f"<{n}I", buf, 0, *(len(b) for b in self._items))
        pos = 4 * n
        for b in self._items:
            buf[pos : pos + len(b)] = b
            pos += len(b)

    def encode(self) -> bytes:
        if self._data is not None:
            return self._data
        out = bytearray(self.encoded_size())
        self.encode_into(memoryview(out))
        return bytes(out)

    def payload(self) -> memoryview:
        """The strings back to back, without the length table."""
        return memoryview(self.encode())[4 * len(self):]

    @classmethod
    def concat(cls, parts: Sequence[ByteStrings]) -> ByteStrings:
        """Join along dimension 0 (the batcher): one table, one payload, no per-string work."""
        lengths = np.concatenate([p.lengths() for p in parts]).astype("<u4")
        data = lengths.tobytes() + b"".join(bytes(p.payload()) for p in parts)
        rows = sum(p.shape[0] if p.shape else 1 for p in parts)
        return cls.from_encoded(data, (rows, *parts[0].shape[1:]))

    def rows(self, start: int, stop: int) -> ByteStrings:
        """Rows [start, stop) along dimension 0 (the batcher's split)."""
        n = self.shape[0] if self.shape else 1
        per_row = len(self) // n if n else 0
        lengths = self.lengths().astype(np.int64)
        offs = np.concatenate(([0], np.cumsum(lengths)))
        a, b = start * per_row, stop * per_row
        payload = self.payload()
        data = lengths[a:b].astype("<u4").tobytes() + bytes(payload[int(offs[a]):int(offs[b])])
        return ByteStrings.from_encoded(data, (stop - start, *self.shape[1:]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ByteStrings):
            return NotImplemented
        return self.shape == other.shape and self.encode() == other.encode()

    def __repr__(self) -> str:
        return f"ByteStrings(shape={list(self.shape)}, nbytes={self.encoded_size()})"


def decode_byte_strings(buf: memoryview, shape: tuple[int, ...], what: str) -> ByteStrings:
    """Decode SPEC §5's length table + payload, checking every length against `buf`. One copy
    of the bytes, no object per string (a request of 11 M two-byte strings must not cost GiBs)."""
    n = numel(shape)
    if 4 * n > len(buf):
        raise BadInputError(
            f"{what}: bytes tensor of {n} strings needs a {4 * n}-byte length table, "
            f"but nbytes is {len(buf)}"
        )
    total = 4 * n + int(np.frombuffer(buf, "<u4", n).sum(dtype=np.uint64))
    if total != len(buf):
        raise BadInputError(
            f"{what}: bytes tensor lengths add up to {total} bytes, but nbytes is {len(buf)}"
        )
    return ByteStrings.from_encoded(bytes(buf), shape)
