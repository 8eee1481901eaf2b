"""Dtypes of SPEC §5: wire names, sizes, torch equivalents, and the `bytes` encoding."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ByteStrings:
    """A tensor of the `bytes` dtype: `items` in row-major order, `len(items) == numel(shape)`."""

    items: list[bytes]
    shape: tuple[int, ...]

    def encoded_size(self) -> int:
        return 4 * len(self.items) + sum(len(b) for b in self.items)

    def encode_into(self, buf: memoryview) -> None:
        n = len(self.items)
        struct.pack_into(f"<{n}I", buf, 0, *(len(b) for b in self.items))
        pos = 4 * n
        for b in self.items:
            buf[pos : pos + len(b)] = b
            pos += len(b)

    def encode(self) -> bytes:
        out = bytearray(self.encoded_size())
        self.encode_into(memoryview(out))
        return bytes(out)


def decode_byte_strings(buf: memoryview, shape: tuple[int, ...], what: str) -> ByteStrings:
    """Decode SPEC §5's length table + payload, checking every length against `buf`."""
    n = numel(shape)
    if 4 * n > len(buf):
        raise BadInputError(
            f"{what}: bytes tensor of {n} strings needs a {4 * n}-byte length table, "
            f"but nbytes is {len(buf)}"
        )
    lengths = struct.unpack_from(f"<{n}I", buf, 0)
    total = 4 * n + sum(lengths)
    if total != len(buf):
        raise BadInputError(
            f"{what}: bytes tensor lengths add up to {total} bytes, but nbytes is {len(buf)}"
        )
    items = []
    pos = 4 * n
    for ln in lengths:
        items.append(bytes(buf[pos : pos + ln]))
        pos += ln
    return ByteStrings(items, shape)
