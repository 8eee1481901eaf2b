"""Canonical msgpack mapping for the contract's dataclasses (SPEC §2.3).

Dataclass fields are declared in the SPEC's canonical key order, so `to_wire` yields maps whose
keys come out in that order, and `from_wire` type-checks every field a peer sent before anything
else looks at it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

import msgpack

T = TypeVar("T")


class WireTypeError(ValueError):
    """A decoded value does not have the type the contract says."""


def packb(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    # raw=False: str stays str; strict_map_key: only str/bytes keys; trailing bytes raise.
    return msgpack.unpackb(data, raw=False, strict_map_key=True)


def to_wire(obj: Any) -> Any:
    """Dataclass (recursively) -> plain dict/list in canonical key order."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        wire_type = getattr(type(obj), "TYPE", None)
        if wire_type is not None:
            out["type"] = wire_type
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if v is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = to_wire(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_wire(v) for v in obj]
    return obj


def from_wire(cls: type[T], value: Any, what: str) -> T:
    """Plain decoded map -> dataclass `cls`, checking every field's type."""
    if not isinstance(value, dict):
        raise WireTypeError(f"{what}: expected a map, got {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in value:
            kwargs[f.name] = _check(hints[f.name], value[f.name], f"{what}.{f.name}")
        elif f.default is not dataclasses.MISSING:
            kwargs[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs[f.name] = f.default_factory()
        else:
            raise WireTypeError(f"{what}: missing field {f.name!r}")
    return cls(**kwargs)


def _check(tp: Any, v: Any, what: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(inner, v, what)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(v, list):
            raise WireTypeError(f"{what}: expected an array, got {type(v).__name__}")
        return [_check(inner, x, f"{what}[{i}]") for i, x in enumerate(v)]
    if origin is dict or tp is dict:
        if not isinstance(v, dict):
            raise WireTypeError(f"{what}: expected a map, got {type(v).__name__}")
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise WireTypeError(f"{what}: expected a bool, got {type(v).__name__}")
        return v
    if tp is int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise WireTypeError(f"{what}: expected an integer, got {type(v).__name__}")
        return v
    if tp is str:
        if not isinstance(v, str):
            raise WireTypeError(f"{what}: expected a string, got {type(v).__name__}")
        return v
    if dataclasses.is_dataclass(tp):
        return from_wire(tp, v, what)
    raise TypeError(f"codec cannot check {tp!r}")  # a bug in the contract module itself
