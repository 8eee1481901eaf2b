"""Dtypes of SPEC §5: wire names, sizes, numpy and torch equivalents, and the `bytes`
encoding.

No torch here: the client and the operator commands run without it (numpy and msgpack only).
The torch equivalents are resolved when the serving side first asks for them, by which time
it has imported torch anyway."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .errors import BadInputError


@dataclass(frozen=True)
class DType:
    name: str
    itemsize: int  # 0 for the variable-length `bytes` dtype
    numpy: str | None  # numpy's name; None for bytes, and for bf16 (numpy has none)
    torch_name: str | None  # the torch module's attribute; None for bytes

    @cached_property
    def torch_dtype(self) -> Any:
        """The torch.dtype (None for bytes); imports torch, so only the serving side asks."""
        if self.torch_name is None:
            return None
        import torch

        return getattr(torch, self.torch_name)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("f16", 2, "float16", "float16"),
        DType("bf16", 2, None, "bfloat16"),
        DType("f32", 4, "float32", "float32"),
        DType("f64", 8, "float64", "float64"),
        DType("i8", 1, "int8", "int8"),
        DType("i16", 2, "int16", "int16"),
        DType("i32", 4, "int32", "int32"),
        DType("i64", 8, "int64", "int64"),
        DType("u8", 1, "uint8", "uint8"),
        DType("bool", 1, "bool", "bool"),
        DType("bytes", 0, None, None),
    )
}

ANY = "any"  # only in model signatures: the model takes every dtype

_BY_NUMPY = {d.numpy: d for d in DTYPES.values() if d.numpy is not None}
_BY_TORCH: dict[Any, DType] = {}


def lookup(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise BadInputError(
            f"unknown dtype {name!r}; the protocol knows {', '.join(DTYPES)}"
        ) from None


def from_torch(dtype: Any) -> DType:
    """The wire dtype of a torch.dtype."""
    if not _BY_TORCH:
        _BY_TORCH.update({d.torch_dtype: d for d in DTYPES.values() if d.torch_name})
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise BadInputError(f"torch dtype {dtype} has no wire dtype") from None


def from_numpy(dtype: Any) -> DType:
    """The wire dtype of a numpy dtype (bf16 arrays come from torch, or as ml_dtypes'
    bfloat16)."""
    name = getattr(dtype, "name", str(dtype))
    if name == "bfloat16":
        return DTYPES["bf16"]
    try:
        return _BY_NUMPY[name]
    except KeyError:
        raise BadInputError(f"numpy dtype {name} has no wire dtype; the protocol knows "
                            f"{', '.join(n for n in _BY_NUMPY)} (and bf16)") from None


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
