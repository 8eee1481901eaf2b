"""The native request intake (tensord._core, daemon/native) against the Python path: the same
descriptors — well-formed, encoded every way msgpack allows, mutated, random — get the same
verdict and error code from `_core.decode_request` as from `decode_request` + `check_refs`, the
same message where both can word it, and equal values when accepted. The same for a model's
signature (`order_inputs` and the session's max_input_bytes check) and the `bytes`/`bool` value
checks. Hypothesis runs derandomized with a bounded number of examples: the test is the same
on every run; exploration is the fuzz targets' job (daemon/native/README.md)."""

from __future__ import annotations

import random
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensord import _core
from tensord.contract.descriptors import (
    MAX_DESCRIPTOR,
    ErrorInfo,
    ResponseDescriptor,
    TensorRef,
    align64,
    check_refs,
    decode_request,
    encode_descriptor,
)
from tensord.contract.dtypes import DTYPES, decode_byte_strings
from tensord.contract.errors import ErrorCode, TensordError, TooLargeError

SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=300,
                    suppress_health_check=list(HealthCheck))


# -- the two paths --------------------------------------------------------------------------

def python_intake(data: bytes, data_start: int, record_len: int):
    try:
        d = decode_request(data)
        check_refs(d.inputs, data_start, record_len, "input")
    except TensordError as e:
        return ("error", int(e.code), e.message)
    return ("ok", d.model, d.timeout_us, d.priority or 0,
            [(t.name, t.dtype, list(t.shape), t.offset, t.nbytes) for t in d.inputs])


def native_intake(data: bytes, data_start: int, record_len: int):
    try:
        model, timeout, priority, refs = _core.decode_request(data, data_start, record_len)
    except _core.RequestError as e:
        return ("error", e.code, e.message)
    return ("ok", model, timeout, priority, [(n, d, list(s), o, b) for n, d, s, o, b in refs])


def same(py, rs) -> None:
    """Same verdict and code; same message unless either side words it in its own terms (the
    msgpack library's complaint, or a non-ASCII name that repr() may escape differently)."""
    assert py[0] == rs[0], (py, rs)
    if py[0] == "ok":
        assert py == rs
        return
    assert py[1] == rs[1], (py, rs)
    if py[2].startswith("request descriptor is not valid msgpack"):
        assert rs[2].startswith("request descriptor is not valid msgpack"), rs
    elif py[2].isascii() and rs[2].isascii():
        assert py[2] == rs[2]


def check(data: bytes, record_extra: int = 256, data_start: int | None = None) -> tuple:
    """Both paths on one descriptor; by default its record's data area starts right after it
    (as a client lays records out)."""
    if data_start is None:
        data_start = align64(24 + len(data))
    record_len = data_start + record_extra
    py = python_intake(data, data_start, record_len)
    same(py, native_intake(data, data_start, record_len))
    return py


# -- every msgpack encoding of a value ------------------------------------------------------

def enc(v, r: random.Random) -> bytes:
    """msgpack of `v` in a form chosen at random among the valid ones: any integer width, any
    str/bin/array/map width, map keys in any order, sometimes a key given twice (the first with
    junk: the last wins)."""
    if v is None:
        return b"\xc0"
    if v is True or v is False:
        return b"\xc3" if v else b"\xc2"
    if isinstance(v, int):
        if not -2**63 <= v < 2**64:
            v %= 2**64  # a product of generated dimensions; any big number does
        forms = []
        if 0 <= v < 128:
            forms.append(bytes([v]))
        if -32 <= v < 0:
            forms.append(struct.pack("b", v))
        for code, fmt, lo, hi in ((0xcc, ">B", 0, 255), (0xcd, ">H", 0, 65535),
                                  (0xce, ">I", 0, 2**32 - 1), (0xcf, ">Q", 0, 2**64 - 1),
                                  (0xd0, ">b", -128, 127), (0xd1, ">h", -2**15, 2**15 - 1),
                                  (0xd2, ">i", -2**31, 2**31 - 1), (0xd3, ">q", -2**63, 2**63 - 1)):
            if lo <= v <= hi:
                forms.append(bytes([code]) + struct.pack(fmt, v))
        return r.choice(forms)
    if isinstance(v, float):
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode()
        forms = [b"\xdb" + struct.pack(">I", len(b)) + b]
        if len(b) < 32:
            forms.append(bytes([0xa0 | len(b)]) + b)
        if len(b) < 256:
            forms.append(b"\xd9" + bytes([len(b)]) + b)
        if len(b) < 65536:
            forms.append(b"\xda" + struct.pack(">H", len(b)) + b)
        return r.choice(forms)
    if isinstance(v, bytes):
        return r.choice([b"\xc4" + bytes([len(v)]), b"\xc6" + struct.pack(">I", len(v))]) + v \
            if len(v) < 256 else b"\xc6" + struct.pack(">I", len(v)) + v
    if isinstance(v, list):
        head = [b"\xdd" + struct.pack(">I", len(v)), b"\xdc" + struct.pack(">H", len(v))]
        if len(v) < 16:
            head.append(bytes([0x90 | len(v)]))
        return r.choice(head) + b"".join(enc(x, r) for x in v)
    if isinstance(v, dict):
        items = list(v.items())
        r.shuffle(items)
        if items and r.random() < 0.2:
            k = r.choice(items)[0]
            items.insert(0, (k, r.choice([None, 7, "junk", [1]])))
        head = [b"\xdf" + struct.pack(">I", len(items)), b"\xde" + struct.pack(">H", len(items))]
        if len(items) < 16:
            head.append(bytes([0x80 | len(items)]))
        return r.choice(head) + b"".join(enc(k, r) + enc(x, r) for k, x in items)
    raise TypeError(v)


# -- descriptors: mostly sound, each field sometimes wrong ----------------------------------

names = st.sampled_from(["x", "y", "ids", "mask", "", "n" * 257, "é", "it's", "a\nb"])
ints = st.one_of(st.integers(0, 300), st.integers(-2**63, 2**64 - 1),
                 st.sampled_from([-1, 0, 63, 64, 2**48, 2**48 + 1, 2**63, 2**64 - 1]))
junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=3),
                 st.binary(max_size=3), st.lists(st.integers(0, 3), max_size=2),
                 st.dictionaries(st.text(max_size=2), st.integers(0, 3), max_size=2))


def maybe(value, wrong):
    """The value most of the time; sometimes something of the wrong type, or nothing."""
    return st.one_of(st.just(value), st.just(value), st.just(value), st.just(value), wrong,
                     st.just(Missing))


class Missing:
    pass


@st.composite
def tensor_ref(draw, offset: int):
    dtype = draw(st.one_of(st.sampled_from(sorted(DTYPES)), st.sampled_from(["f31", "F32", ""])))
    shape = draw(st.one_of(st.lists(st.integers(0, 5), max_size=4),
                           st.lists(ints, max_size=3), st.lists(st.integers(1, 2), max_size=18)))
    size = DTYPES[dtype].itemsize if dtype in DTYPES else 1
    n = 1
    for d in shape:
        n *= d
    nbytes = draw(st.one_of(st.just(max(n, 0) * (size or 1)), ints))
    ref = {
        "name": draw(maybe(draw(names), junk)),
        "dtype": draw(maybe(dtype, junk)),
        "shape": draw(maybe(shape, st.one_of(junk, st.just([1, True]), st.just([1.5])))),
        "offset": draw(maybe(draw(st.one_of(st.just(offset), ints)), junk)),
        "nbytes": draw(maybe(nbytes, junk)),
    }
    if draw(st.booleans()):
        ref["extra"] = draw(junk)
    return {k: v for k, v in ref.items() if v is not Missing}


@st.composite
def request(draw):
    n = draw(st.integers(0, 3))
    refs, off = [], 64 * draw(st.integers(1, 3))
    for _ in range(n):
        refs.append(draw(tensor_ref(off)))
        off += 64 * draw(st.integers(0, 2))
    if refs and draw(st.integers(0, 9)) == 0:
        refs = refs * 22  # past the 64-input limit
    d = {
        "model": draw(maybe(draw(names), junk)),
        "timeout_us": draw(maybe(draw(ints), junk)),
        "inputs": draw(maybe(refs, st.one_of(junk, st.just([1]), st.just(["x"])))),
        "priority": draw(st.one_of(st.just(Missing), st.none(), st.integers(-1, 2), junk)),
    }
    if draw(st.booleans()):
        d[draw(st.sampled_from(["Model", "x", "input"]))] = draw(junk)
    d = {k: v for k, v in d.items() if v is not Missing}
    top = draw(st.one_of(st.just(d), st.just(d), st.just(d), junk))
    return enc(top, draw(st.randoms(use_true_random=False)))


@SETTINGS
@given(request(), st.integers(0, 16).map(lambda k: 64 * k))
def test_same_verdict_on_structured_descriptors(data, extra):
    check(data, extra)


def mutate(data: bytes, r: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(r.randint(1, 4)):
        op = r.randrange(4)
        i = r.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] ^= 1 << r.randrange(8)
        elif op == 1:
            b[i:i] = bytes([r.choice([0xc1, 0xff, 0x00, 0x7f, 0x80, 0x90, 0xa0, 0xd9, 0xdd, 0xdf,
                                      0xd4, 0xc7, r.randrange(256)])])
        elif op == 2 and b:
            del b[i:i + r.randint(1, 3)]
        else:
            b = b[:i]
    return bytes(b)


@SETTINGS
@given(request(), st.randoms(use_true_random=False))
def test_same_verdict_on_mutated_descriptors(data, r):
    check(mutate(data, r))


@SETTINGS
@given(st.binary(max_size=64))
def test_same_verdict_on_random_bytes(data):
    check(data)


def test_the_generators_reach_both_verdicts_and_every_refusal_code():
    """Sanity: a differential test that only ever sees refusals (or acceptances) proves little."""
    r = random.Random(7)
    seen = set()
    good = {"model": "m", "timeout_us": 5, "inputs": [
        {"name": "x", "dtype": "f32", "shape": [2, 3], "offset": 64, "nbytes": 24},
        {"name": "b", "dtype": "bytes", "shape": [2], "offset": 128, "nbytes": 10}],
        "priority": 1}
    for _ in range(50):
        py = check(enc(good, r), data_start=64)
        assert py[0] == "ok", py
        seen.add(py[0])
    refusals = {
        "refs outside": {**good, "inputs": [{**good["inputs"][0], "offset": 1 << 20}]},
        "overlap": {**good, "inputs": [good["inputs"][0], {**good["inputs"][0], "name": "z"}]},
        "rank": {**good, "inputs": [{**good["inputs"][0], "shape": [1] * 17, "nbytes": 4}]},
        "dtype": {**good, "inputs": [{**good["inputs"][0], "dtype": "f8"}]},
        "negative dim": {**good, "inputs": [{**good["inputs"][0], "shape": [-1, 3]}]},
        "unaligned": {**good, "inputs": [{**good["inputs"][0], "offset": 65}]},
        "priority": {**good, "priority": 2},
        "timeout": {**good, "timeout_us": -1},
        "type": {**good, "model": 3},
        "missing": {"model": "m", "timeout_us": 0},
        "too many": {**good, "inputs": [good["inputs"][0]] * 65},
    }
    codes = {}
    for what, d in refusals.items():
        py = check(enc(d, r), 4096, data_start=64)
        assert py[0] == "error", what
        codes[what] = py[1]
    assert {ErrorCode.BAD_INPUT, ErrorCode.BAD_REQUEST} == set(codes.values())
    assert check(b"\x81\xa1a\x01\x00")[1] == ErrorCode.BAD_REQUEST  # trailing bytes


def test_descriptor_size_limit_and_nesting_limit():
    big = msgpack.packb({"model": "m", "timeout_us": 0, "inputs": [], "pad": "x" * MAX_DESCRIPTOR})
    assert check(big)[1] == ErrorCode.BAD_REQUEST
    for depth in (1023, 1024, 1025):  # msgpack-python's stack limit
        head = b"\x84\xa5model\xa1m\xaatimeout_us\x00\xa6inputs\x90\xa1z"
        check(head + b"\x91" * depth + b"\xc0")


def test_vectors_decode_alike():
    """The golden request vectors, canonical and alternative encodings."""
    import json
    import pathlib
    cases = json.loads((pathlib.Path(__file__).parents[1] / "protocol/vectors/vectors.json")
                       .read_text())
    n = 0
    for c in cases:
        if c["kind"] == "request_descriptor":
            for h in [c["hex"], *c.get("alt_hex", [])]:
                assert check(bytes.fromhex(h), 1 << 20, data_start=64)[0] == "ok"
                n += 1
    assert n >= 3


# -- response descriptors -------------------------------------------------------------------

@SETTINGS
@given(st.lists(st.tuples(st.text(max_size=40), st.sampled_from(sorted(DTYPES)),
                          st.lists(st.integers(0, 2**64 - 1), max_size=5),
                          st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=20))
def test_response_outputs_encode_byte_identical(outputs):
    want = encode_descriptor(ResponseDescriptor(outputs=[TensorRef(*o) for o in outputs]))
    assert _core.encode_response_outputs(outputs) == want


@SETTINGS
@given(st.sampled_from(list(ErrorCode)), st.text(max_size=5000))
def test_response_errors_encode_byte_identical(code, message):
    want = encode_descriptor(ResponseDescriptor(error=ErrorInfo(int(code), code.name, message)))
    assert _core.encode_response_error(int(code), code.name, message) == want


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["y", "logits", "z" * 40]),
                          st.sampled_from(["f32", "i64"]),
                          st.lists(st.integers(0, 70000), max_size=3),
                          st.integers(0, 1 << 40)), max_size=8))
def test_response_plan_matches_the_python_planner(outputs):
    from tensord.transport.records import plan

    def encode(offsets):
        return encode_descriptor(ResponseDescriptor(outputs=[
            TensorRef(n, d, s, o, b) for (n, d, s, b), o in zip(outputs, offsets)]))
    record_len, desc, offsets = plan([b for *_, b in outputs], encode)
    assert _core.plan_outputs(outputs) == (record_len, desc, offsets)


# -- signatures and value checks ------------------------------------------------------------

spec = st.tuples(st.sampled_from(["x", "y", "mask"]), st.sampled_from(["f32", "i64", "any"]),
                 st.one_of(st.none(), st.lists(st.sampled_from([-1, 1, 2, 16]), max_size=3)))
ref = st.tuples(st.sampled_from(["x", "y", "mask", "z"]), st.sampled_from(["f32", "i64", "u8"]),
                st.lists(st.sampled_from([0, 1, 2, 3, 16, 40]), max_size=3),
                st.just(64), st.integers(0, 5000))


@SETTINGS
@given(st.lists(spec, max_size=3), st.lists(ref, max_size=4), st.sampled_from([0, 2, 8]),
       st.sampled_from([0, 100, 4096]))
def test_signature_orders_and_refuses_like_order_inputs(specs, refs, max_batch, max_bytes):
    from tensord.models.signature import Signature, Spec

    sig = Signature(tuple(Spec(n, d, None if s is None else tuple(s)) for n, d, s in specs),
                    (), max_batch)
    wire = [TensorRef(*r) for r in refs]
    try:  # the session's max_input_bytes check, then order_inputs
        if max_bytes and (total := sum(t.nbytes for t in wire)) > max_bytes:
            raise TooLargeError(
                f"the request's inputs are {total} bytes; model 'm' takes at most {max_bytes} "
                "(max_input_bytes in its config): send smaller requests")
        py = ("ok", sig.order_inputs("m", wire))
    except TensordError as e:
        py = ("error", int(e.code), e.message)
    native = _core.Signature("m", specs, max_batch, max_bytes)
    try:
        rs = ("ok", native.order(refs))
    except _core.RequestError as e:
        rs = ("error", e.code, e.message)
    assert py == rs


@SETTINGS
@given(st.lists(st.binary(max_size=6), max_size=6), st.integers(-2, 2), st.binary(max_size=3))
def test_byte_strings_check_like_decode_byte_strings(items, miscount, tail):
    table = struct.pack(f"<{len(items)}I", *map(len, items)) + b"".join(items) + tail
    count = max(len(items) + miscount, 0)
    try:
        want = decode_byte_strings(memoryview(table), (count,), "input 't'").items
    except TensordError as e:
        with pytest.raises(_core.RequestError) as got:
            _core.byte_strings(table, count, "t")
        assert (got.value.code, got.value.message) == (int(e.code), e.message)
        return
    raw = _core.byte_strings(table, count, "t")
    offsets = struct.unpack(f"<{count + 1}Q", raw)
    assert [table[a:b] for a, b in zip(offsets, offsets[1:])] == want


def test_bool_values_are_checked():
    _core.check_bools(b"\x00\x01\x01", "b")
    with pytest.raises(_core.RequestError) as e:
        _core.check_bools(b"\x00\x02", "b")
    assert e.value.code == ErrorCode.BAD_INPUT
    assert e.value.message == "input 'b': bool tensor holds bytes other than 0 and 1"


def test_intake_decodes_and_orders_in_one_call():
    sig = _core.Signature("mlp", [("a", "f32", [-1, 2]), ("b", "any", None)])
    desc = msgpack.packb({"model": "mlp", "timeout_us": 9, "inputs": [
        {"name": "b", "dtype": "u8", "shape": [3], "offset": 128, "nbytes": 3},
        {"name": "a", "dtype": "f32", "shape": [1, 2], "offset": 192, "nbytes": 8}]})
    model, timeout, priority, refs = sig.intake(desc, 64, 256)
    assert (model, timeout, priority) == ("mlp", 9, 0)
    assert [r[0] for r in refs] == ["a", "b"]
    with pytest.raises(_core.RequestError) as e:
        sig.intake(desc, 64, 192)  # "a" lies past the record
    assert e.value.code == ErrorCode.BAD_INPUT
