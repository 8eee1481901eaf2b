"""Property fuzzing of everything the daemon decodes from a client: control frames, request
descriptors (through to the tensors the daemon would build from them) and ring records (the
native core's validator). Hypothesis generates inputs, structured and raw.

`pytest tests/test_fuzz.py` runs a small number of examples of each; with
TENSORD_FUZZ_SECONDS=N each target runs for about N seconds (tests/run.sh does that). A failure
prints the smallest input hypothesis found.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import time
import typing

import msgpack
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensord import _core
from tensord.contract.descriptors import (
    MAX_DIM,
    MAX_TENSORS,
    align64,
    check_refs,
    decode_request,
)
from tensord.contract.dtypes import DTYPES, decode_byte_strings, lookup
from tensord.contract.errors import BadInputError, BadRequestError, ProtocolError
from tensord.contract.frames import MAX_FRAME, FrameBuffer, encode_frame
from tensord.contract.layout import (
    HEADER_SIZE,
    KIND_PAD,
    KIND_REQUEST,
    RECORD_HEADER,
    REQ_CONTROL,
    write_header,
)
from tensord.contract.messages import MESSAGE_TYPES
from tensord.transport import records
from tensord.transport.ring import RingConsumer, RingControl, Shm

FUZZ_SECONDS = float(os.environ.get("TENSORD_FUZZ_SECONDS", "0") or 0)
settings.register_profile("tensord", deadline=None, database=None, max_examples=500
                          if FUZZ_SECONDS else 150,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large,
                                                 HealthCheck.filter_too_much])
settings.load_profile("tensord")


def run(target) -> None:
    """Once (a normal test run), or again and again with fresh random inputs for
    TENSORD_FUZZ_SECONDS."""
    end = time.monotonic() + FUZZ_SECONDS
    rounds = 0
    while True:
        target()
        rounds += 1
        if time.monotonic() >= end:
            break
    if FUZZ_SECONDS:
        print(f"{target.__name__}: {rounds} rounds in {FUZZ_SECONDS:.0f} s")


# -- values a hostile client might send ---------------------------------------------------------

ints = st.one_of(st.integers(-2**63, 2**64 - 1), st.sampled_from(
    [0, 1, -1, 63, 64, 65536, 2**31, 2**32, 2**48, 2**63 - 1, 2**64 - 1, -2**63]))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=20)


def _plausible(tp) -> st.SearchStrategy:
    """A value of the field's declared type (mostly in range), sometimes anything at all."""
    good = {int: st.integers(0, 2**64 - 1) | st.integers(1, 10), str: st.text(max_size=20),
            bool: st.booleans()}.get(tp, st.just([]) if "list" in str(tp) else st.just({}))
    return st.one_of(good, good, good, values)


def message_maps():
    """Maps shaped like messages: a known type and its fields, mostly well-typed, sometimes
    missing, extra or wrong."""
    def fields_for(t):
        cls = MESSAGE_TYPES[t]
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        return st.fixed_dictionaries(
            {"type": st.just(t)} | {n: _plausible(hints[n]) for n in names},
            optional={"extra": values}).flatmap(
            lambda m: st.sets(st.sampled_from(sorted(m)), max_size=1).map(
                lambda drop: {k: v for k, v in m.items() if k not in drop or k == "type"}))
    return st.sampled_from(sorted(MESSAGE_TYPES)).flatmap(fields_for)


# == control frames ==============================================================================

framed = message_maps().map(msgpack.packb).map(lambda b: struct.pack("<I", len(b)) + b)


@given(st.one_of(
    st.lists(framed, min_size=1, max_size=3).map(b"".join),
    st.lists(framed, min_size=1, max_size=3).map(b"".join),
    st.binary(max_size=300),
    st.builds(lambda frame, junk: frame + junk, framed, st.binary(max_size=8)),
    st.builds(lambda n, body: struct.pack("<I", n) + body,
              st.sampled_from([0, 1, MAX_FRAME, MAX_FRAME + 1, 2**32 - 1]),
              st.binary(max_size=40))),
    st.lists(st.integers(1, 50), max_size=5))
def frames(data: bytes, cuts: list[int]) -> None:
    """However the bytes arrive, the frame buffer yields messages or raises ProtocolError; a
    message it yields is well-typed (every integer in range) and re-encodes to itself."""
    buf = FrameBuffer()
    pieces, pos = [], 0
    for c in cuts:
        pieces.append(data[pos:pos + c])
        pos += c
    pieces.append(data[pos:])
    try:
        for p in pieces:
            buf.feed(p)
            while (msg := buf.next()) is not None:
                for name, v in vars(msg).items():
                    if type(v) is int:
                        assert 0 <= v < 2**64, (name, v)
                again = FrameBuffer()
                try:
                    again.feed(encode_frame(msg))
                except ProtocolError:  # too large to send back: refused, never corrupted
                    continue
                assert again.next() == msg
        assert len(buf) <= 4 + MAX_FRAME  # never more than one frame is buffered
    except ProtocolError as e:
        assert e.code.name in ("BAD_FRAME", "BAD_MESSAGE"), e


def test_fuzz_control_frames():
    run(frames)


# == request descriptors, through to the tensors the daemon builds ===============================

dims = st.one_of(st.integers(0, 8), st.sampled_from([0, 1, 2**16, 2**32, 2**47, 2**48,
                                                     2**48 + 1, 2**63, -1]))
refs = st.fixed_dictionaries({
    "name": st.one_of(st.text(max_size=8), st.text(min_size=250, max_size=300), ints),
    "dtype": st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=5)),
    "shape": st.one_of(st.lists(dims, max_size=18), values),
    "offset": st.one_of(st.integers(0, 1024).map(lambda n: n * 64), ints),
    "nbytes": st.one_of(st.integers(0, 256), ints),
})


@st.composite
def plausible_descriptors(draw) -> bytes:
    """Descriptors a correct client would write (tensors laid out after the descriptor, sizes
    that match), then some field made hostile."""
    n = draw(st.integers(0, 3))
    data_start = 512
    inputs, off = [], data_start
    for i in range(n):
        dt = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=4))
        if draw(st.booleans()) and draw(st.booleans()):
            shape = [0, *draw(st.lists(st.sampled_from([2**20, 2**30, 2**40, 2**47]),
                                       min_size=1, max_size=3))]
        count = 1
        for d in shape:
            count *= d
        size = DTYPES[dt].itemsize * count if DTYPES[dt].itemsize else 4 * count
        inputs.append({"name": f"x{i}", "dtype": dt, "shape": shape, "offset": off,
                       "nbytes": size})
        off = align64(off + size)
    desc = {"model": "m", "timeout_us": draw(st.integers(0, 10**6)), "inputs": inputs}
    if inputs and draw(st.booleans()):
        victim = draw(st.sampled_from(inputs))
        key = draw(st.sampled_from(["shape", "offset", "nbytes", "dtype", "name"]))
        victim[key] = draw(refs.map(lambda r, k=key: r[k]))
    return msgpack.packb(desc)


descriptors = st.one_of(
    plausible_descriptors(), plausible_descriptors(),
    st.binary(max_size=200),
    st.fixed_dictionaries({"model": st.one_of(st.text(max_size=8), ints),
                           "timeout_us": st.one_of(ints, values),
                           "inputs": st.one_of(st.lists(refs, max_size=4),
                                               st.lists(refs, min_size=65, max_size=66),
                                               values)},
                          optional={"priority": st.one_of(ints, values)}).map(msgpack.packb))


@given(descriptors, st.integers(9, 12).map(lambda n: 1 << n) | st.integers(0, 8).map(
    lambda n: 64 * (1 << n)))
def request_descriptors(data: bytes, record_len: int) -> None:
    """A descriptor is refused with BAD_REQUEST or BAD_INPUT, or every tensor it names can be
    built from the record's bytes exactly as the daemon builds it (no other exception)."""
    try:
        desc = decode_request(data)
        data_start = min(512, align64(24 + len(data)))
        check_refs(desc.inputs, data_start, record_len, "input")
    except (BadRequestError, BadInputError):
        return
    assert len(desc.inputs) <= MAX_TENSORS and desc.timeout_us >= 0
    buf = memoryview(bytearray(record_len))
    for ref in desc.inputs:
        assert ref.offset % 64 == 0 and data_start <= ref.offset
        assert 0 <= ref.nbytes and ref.offset + ref.nbytes <= record_len
        dt = lookup(ref.dtype)
        shape = tuple(ref.shape)
        n = 1
        for d in shape:
            assert 0 <= d <= MAX_DIM
            n *= max(d, 1)
        assert n <= MAX_DIM
        if dt.torch_dtype is None:
            try:
                decode_byte_strings(buf[ref.offset:ref.offset + ref.nbytes], shape, "x")
            except BadInputError:
                pass
        else:
            t = records.read_tensor(buf, ref.offset, dt.torch_dtype, dt.itemsize, ref.nbytes,
                                    shape)
            assert tuple(t.shape) == shape and t.dtype == dt.torch_dtype
            del t


def test_fuzz_request_descriptors():
    run(request_descriptors)


# == ring records: the native core's validator ===================================================

CAP = 1 << 16
sound = st.tuples(st.integers(1, 40).map(lambda n: 64 * n),
                  st.sampled_from([KIND_PAD, KIND_REQUEST, KIND_REQUEST]),
                  st.integers(0, 2**64 - 1), st.integers(0, 40))
hostile = st.tuples(st.integers(0, 40).map(lambda n: 64 * n) | ints.map(lambda v: v % 2**32),
                    st.sampled_from([KIND_PAD, KIND_REQUEST, 2, 3, 2**32 - 1]),
                    st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1) | st.integers(0, 200))
record = st.one_of(sound, sound, sound, hostile)


@given(st.lists(record, max_size=40), st.one_of(
    st.just(None), st.just(None), st.integers(0, 2 * CAP // 64).map(lambda n: n * 64),
    ints.map(lambda v: v % 2**64)), st.integers(1, 20), st.randoms(use_true_random=False))
def ring_records(recs: list, tail: int | None, limit: int, rnd) -> None:
    """Whatever the client wrote into its ring and its tail, the consumer raises CorruptError
    or returns records that lie inside the ring, within what was published, at most `limit`
    per poll; releasing them in any order never moves head past tail."""
    with mmap.mmap(-1, HEADER_SIZE + 2 * CAP) as mm:
        write_header(memoryview(mm), CAP, CAP)
        pos = 0
        for n, kind, rid, dlen in recs:
            if pos + 24 > CAP:
                break
            RECORD_HEADER.pack_into(mm, HEADER_SIZE + pos, n, kind, rid, dlen, 0)
            pos += max(64, n - n % 64) if n < CAP else 64
        if tail is None:  # what a producer publishes: the end of what it wrote
            tail = min(pos, CAP)
        shm = Shm(mm)
        try:
            ctl = RingControl(shm, REQ_CONTROL)
            ctl.set_tail(tail)
            consumer = RingConsumer(ctl, HEADER_SIZE, CAP, KIND_REQUEST)
            held = []
            for _ in range(4):
                try:
                    got = consumer.poll(limit)
                except ProtocolError as e:
                    assert e.code.name == "BAD_RECORD" and e.fatal
                    return
                assert len(got) <= limit
                for r in got:
                    start = r.offset - HEADER_SIZE
                    assert 0 <= start and start + r.record_len <= CAP, (start, r.record_len)
                    assert r.record_len % 64 == 0 and r.record_len >= 64
                    assert r.desc_len <= r.record_len - 24
                    assert r.position + r.record_len <= tail
                held += got
                rnd.shuffle(held)
                while held and rnd.random() < 0.7:
                    consumer.release(held.pop())
                    assert consumer.core.head <= consumer.read <= tail
                    assert ctl.head() == consumer.core.head
        finally:
            shm.close()


def test_fuzz_ring_records():
    run(ring_records)


def test_fuzz_targets_reject_what_they_must():
    """Sanity: the generators reach the refusals (a fuzz target that accepts everything finds
    nothing)."""
    with np.errstate(all="ignore"):
        buf = FrameBuffer()
        buf.feed(struct.pack("<I", MAX_FRAME + 1))
        try:
            buf.next()
            raise AssertionError("an oversized frame was accepted")
        except ProtocolError as e:
            assert e.code.name == "BAD_FRAME"
    try:
        decode_request(msgpack.packb({"model": "m", "timeout_us": -1, "inputs": []}))
        raise AssertionError("a negative timeout was accepted")
    except BadRequestError:
        pass
    assert torch.empty((0, 2**16), dtype=torch.float32).numel() == 0
    assert isinstance(_core.CorruptError, type)
