"""Canonical msgpack mapping for the contract's dataclasses (SPEC §2.3).

Dataclass fields are declared in the SPEC's canonical key order, so `to_wire` yields maps whose
keys come out in that order, and `from_wire` type-checks every field a peer sent before anything
else looks at it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
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
    enc = _ENCODERS.get(type(obj))
    if enc is not None:
        return enc(obj)
    if isinstance(obj, (list, tuple)):
        return [to_wire(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        enc = _ENCODERS[type(obj)] = _dataclass_encoder(type(obj))
        return enc(obj)
    return obj


_ENCODERS: dict[type, Callable[[Any], dict]] = {}


def _dataclass_encoder(cls: type) -> Callable[[Any], dict]:
    # Built once per class: responses are encoded per request, and dataclasses.fields() plus
    # is_dataclass checks per value cost more than the msgpack encoding itself.
    wire_type = getattr(cls, "TYPE", None)
    fields = [(f.name, bool(f.metadata.get("omit_none"))) for f in dataclasses.fields(cls)]

    def encode(obj: Any) -> dict:
        out: dict[str, Any] = {} if wire_type is None else {"type": wire_type}
        for name, omit_none in fields:
            v = getattr(obj, name)
            if v is None and omit_none:
                continue
            out[name] = v if type(v) in _PLAIN else to_wire(v)
        return out
    return encode


_PLAIN = frozenset({int, str, bool, float, bytes, type(None)})


def from_wire(cls: type[T], value: Any, what: str) -> T:
    """Plain decoded map -> dataclass `cls`, checking every field's type."""
    return _checker(cls)(value, what)


Checker = Callable[[Any, str], Any]


@functools.cache
def _checker(tp: Any) -> Checker:
    """Build (once per type) a function that type-checks a decoded value. Checking a descriptor
    is on every request's path, so the typing introspection happens here and not per call."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        check_inner = _checker(inner)
        return lambda v, what: None if v is None else check_inner(v, what)
    if origin is list:
        (inner,) = typing.get_args(tp)
        check_item = _checker(inner)

        def check_list(v: Any, what: str) -> list:
            if not isinstance(v, list):
                raise WireTypeError(f"{what}: expected an array, got {type(v).__name__}")
            return [check_item(x, f"{what}[{i}]") for i, x in enumerate(v)]
        return check_list
    if origin is dict or tp is dict:
        return _simple(dict, "a map")
    if tp is bool:
        return _simple(bool, "a bool")
    if tp is int:
        def check_int(v: Any, what: str) -> int:
            # bool is an int subclass in Python, but not an integer on the wire
            if type(v) is not int:
                raise WireTypeError(f"{what}: expected an integer, got {type(v).__name__}")
            return v
        return check_int
    if tp is str:
        return _simple(str, "a string")
    if dataclasses.is_dataclass(tp):
        return _dataclass_checker(tp)
    raise TypeError(f"codec cannot check {tp!r}")  # a bug in the contract module itself


def _simple(t: type, name: str) -> Checker:
    def check(v: Any, what: str) -> Any:
        if not isinstance(v, t):
            raise WireTypeError(f"{what}: expected {name}, got {type(v).__name__}")
        return v
    return check


def _same(v: Any) -> Any:
    return v


def _dataclass_checker(cls: type) -> Checker:
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default: Any = functools.partial(_same, f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory
        else:
            default = None
        fields.append((f.name, default, hints[f.name]))
    checkers = {name: None for name, _, _ in fields}

    def check(value: Any, what: str) -> Any:
        if not isinstance(value, dict):
            raise WireTypeError(f"{what}: expected a map, got {type(value).__name__}")
        kwargs = {}
        for name, default, tp in fields:
            if name in value:
                c = checkers[name]
                if c is None:  # resolved lazily: dataclasses may refer to each other
                    c = checkers[name] = _checker(tp)
                kwargs[name] = c(value[name], f"{what}.{name}")
            elif default is not None:
                kwargs[name] = default()
            else:
                raise WireTypeError(f"{what}: missing field {name!r}")
        return cls(**kwargs)
    return check
