"""Golden vectors (protocol/vectors): decode each, compare, re-encode byte for byte."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import msgpack
import pytest

from tensord.contract.codec import from_wire, to_wire
from tensord.contract.descriptors import (
    RequestDescriptor,
    decode_request,
    decode_response,
    encode_descriptor,
)
from tensord.contract.frames import decode_body, encode_frame
from tensord.contract.layout import (
    HEADER_SIZE,
    KIND_PAD,
    LAYOUT_VERSION,
    REQ_CONTROL,
    RESP_CONTROL,
    RecordHeader,
    read_header,
)
from tensord.contract.messages import decode_message

VECTORS = Path(__file__).resolve().parent.parent / "protocol" / "vectors"
CASES = json.loads((VECTORS / "vectors.json").read_text())


def _decode(kind: str, raw: bytes):
    if kind == "frame":
        (n,) = struct.unpack_from("<I", raw)
        assert n == len(raw) - 4
        value = decode_body(raw[4:])
        return value, encode_frame(decode_message(value))
    if kind == "request_descriptor":
        d = decode_request(raw)
        return to_wire(d), encode_descriptor(d)
    if kind == "response_descriptor":
        d = decode_response(raw)
        return to_wire(d), encode_descriptor(d)
    if kind == "record_header":
        h = RecordHeader.unpack_from(raw)
        value = {"record_len": h.record_len, "kind": h.kind, "request_id": h.request_id,
                 "desc_len": h.desc_len}
        return value, h.pack()
    raise AssertionError(kind)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_vector(case):
    raw = bytes.fromhex(case["hex"])
    value, reencoded = _decode(case["kind"], raw)
    assert value == case["value"]
    assert list(value) == list(case["value"]), "key order is part of the canonical form"
    assert reencoded.hex() == case["hex"]
    for alt in case.get("alt_hex", []):
        alt_value, alt_reencoded = _decode(case["kind"], bytes.fromhex(alt))
        assert alt_value == case["value"]
        assert alt_reencoded.hex() == case["hex"], "re-encoding must be canonical"


def test_every_message_type_has_a_vector():
    from tensord.contract.messages import MESSAGE_TYPES

    covered = {c["value"]["type"] for c in CASES if c["kind"] == "frame"}
    assert covered == set(MESSAGE_TYPES)


def test_alt_encodings_really_differ():
    for c in CASES:
        for alt in c.get("alt_hex", []):
            assert alt != c["hex"]


def test_ring_image():
    img = memoryview((VECTORS / "ring_image.bin").read_bytes())
    want = json.loads((VECTORS / "ring_image.json").read_text())
    h = read_header(img)
    assert h.layout_version == LAYOUT_VERSION
    assert h.segment_size == len(img) == want["segment_size"]
    for ring, ctl, off, cap in (("request_ring", REQ_CONTROL, h.request_ring_offset,
                                 h.request_ring_capacity),
                                ("response_ring", RESP_CONTROL, h.response_ring_offset,
                                 h.response_ring_capacity)):
        w = want[ring]
        tail, head = struct.unpack_from("<Q", img, ctl)[0], struct.unpack_from("<Q", img,
                                                                               ctl + 64)[0]
        assert (head, tail) == (w["head"], w["tail"])
        assert struct.unpack_from("<I", img, ctl + 72)[0] == w.get("consumer_waiting", 0)
        pos, got = head, []
        while pos < tail:
            at = off + pos % cap
            rh = RecordHeader.unpack_from(img, at)
            rec = {"position": pos, "segment_offset": at, "record_len": rh.record_len,
                   "kind": rh.kind, "request_id": rh.request_id, "desc_len": rh.desc_len}
            if rh.kind != KIND_PAD:
                raw = bytes(img[at + 24:at + 24 + rh.desc_len])
                d = decode_request(raw) if ring == "request_ring" else decode_response(raw)
                rec["descriptor"] = to_wire(d)
                refs = d.inputs if isinstance(d, RequestDescriptor) else d.outputs
                rec["tensors"] = [bytes(img[at + r.offset:at + r.offset + r.nbytes]).hex()
                                  for r in refs]
            got.append(rec)
            pos += rh.record_len
        assert got == w["records"]
    assert HEADER_SIZE == 4096


def test_from_wire_rejects_wrong_types():
    from tensord.contract.codec import WireTypeError
    from tensord.contract.messages import Hello

    with pytest.raises(WireTypeError, match="min_version"):
        from_wire(Hello, {"min_version": "1", "max_version": 1, "client": "", "request_ring": 0,
                          "response_ring": 0}, "hello")
    with pytest.raises(WireTypeError, match="missing field 'client'"):
        from_wire(Hello, {"min_version": 1, "max_version": 1}, "hello")
    # bool is not an integer on the wire, even though Python thinks so
    with pytest.raises(WireTypeError):
        from_wire(Hello, {"min_version": True, "max_version": 1, "client": "",
                          "request_ring": 0, "response_ring": 0}, "hello")
    assert msgpack.packb(1) == b"\x01"
