"""Regenerate the golden vectors: `python protocol/vectors/generate.py`.

The vectors are the contract in bytes. Regenerate them only together with a SPEC.md change and
a protocol version bump; both implementations' test suites read them.
"""

from __future__ import annotations

import json
import os
import struct

import msgpack

from tensord.contract import messages as m
from tensord.contract.codec import to_wire
from tensord.contract.descriptors import (
    ErrorInfo,
    RequestDescriptor,
    ResponseDescriptor,
    TensorRef,
    encode_descriptor,
)
from tensord.contract.frames import encode_frame
from tensord.contract.layout import (
    HEADER_SIZE,
    KIND_PAD,
    KIND_REQUEST,
    KIND_RESPONSE,
    REQ_CONTROL,
    RESP_CONTROL,
    RecordHeader,
    write_header,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def frame(name, msg, alt=()):
    return {"name": name, "kind": "frame", "hex": encode_frame(msg).hex(),
            "value": to_wire(msg), **({"alt_hex": list(alt)} if alt else {})}


def desc(name, kind, d, alt=()):
    return {"name": name, "kind": kind, "hex": encode_descriptor(d).hex(), "value": to_wire(d),
            **({"alt_hex": list(alt)} if alt else {})}


def alt_frame(value_pairs):
    """A non-canonical frame: every int as uint32/int32, every str as str8."""
    body = bytearray()
    body += b"\xdf" + struct.pack(">I", len(value_pairs))  # map32 header
    for k, v in value_pairs:
        for x in (k, v):
            if isinstance(x, bool):
                body += b"\xc3" if x else b"\xc2"
            elif isinstance(x, int):
                body += (b"\xce" + struct.pack(">I", x)) if x >= 0 else \
                    (b"\xd2" + struct.pack(">i", x))
            elif isinstance(x, str):
                b = x.encode()
                body += b"\xd9" + bytes([len(b)]) + b
            else:
                body += msgpack.packb(x, use_bin_type=True)
    return (struct.pack("<I", len(body)) + body).hex()


def cases():
    ident = m.ModelInfo("identity", 1, "cpu", [m.TensorSpec("x", "any", None)],
                        [m.TensorSpec("y", "any", None)], kind="builtin", idempotent=True)
    mlp = m.ModelInfo("mlp", 3, "cuda:0", [m.TensorSpec("x", "f32", [-1, 16])],
                      [m.TensorSpec("y", "f32", [-1, 4])], kind="torchscript", idempotent=False)
    resnet = m.ModelInfo(
        "resnet", 2, "cpu", [m.TensorSpec("image", "bytes", [-1], "image")],
        [m.TensorSpec("labels", "bytes", [-1, 5], "labels"),
         m.TensorSpec("scores", "f32", [-1, 5], "scores")], kind="vision.classify",
        limits=m.ModelLimits(max_batch=64, max_bytes=33554432, max_pixels=40000000,
                             formats=["png", "jpeg", "webp"]), idempotent=True)
    sess = "00112233445566778899aabbccddeeff"
    out = [
        frame("hello", m.Hello(4, 5, "vectors", 0, 1 << 20)),
        frame("hello_control_only", m.Hello(4, 4, "tensord health", 65536, 65536,
                                            control_only=True)),
        frame("welcome_control_only", m.Welcome(4, sess, 0, 0, 0, 1 << 20, "tensord 0.1.0")),
        frame("welcome", m.Welcome(5, sess, 4096 + (1 << 24) + (1 << 20), 1 << 24, 1 << 20,
                                   1 << 20, "tensord 0.1.0")),
        frame("attached", m.Attached()),
        frame("ready", m.Ready()),
        frame("models", m.Models(1)),
        frame("model_list", m.ModelList(1, [ident, mlp, resnet])),
        frame("ping", m.Ping(7), alt=[alt_frame([("type", "ping"), ("id", 7)])]),
        frame("pong", m.Pong(4294967296)),
        frame("load", m.Load(9, "resnet", {"source": "torchscript", "path": "/m/r.pt"})),
        frame("unload", m.Unload(10, "resnet")),
        frame("reload", m.Reload(11, "resnet")),
        frame("ok", m.Ok(9)),
        frame("error", m.Error(3, 4, "UNKNOWN_MODEL", "no model named 'nope'", False),
              alt=[alt_frame([("type", "error"), ("id", 3), ("code", 4),
                              ("name", "UNKNOWN_MODEL"), ("message", "no model named 'nope'"),
                              ("fatal", False)])]),
        frame("error_fields", m.Error(0, 6, "TOO_LARGE", "asked for rings of 2147483648 and "
                                      "65536 bytes; this daemon allows at most 1073741824 per "
                                      "ring (max_ring in its config)", True, limit=1 << 30)),
        frame("error_fatal", m.Error(0, 10, "BAD_RECORD", "record length 12 is not a multiple "
                                     "of 64", True)),
        frame("goodbye", m.Goodbye("client closed")),
        frame("stats", m.Stats(12)),
        frame("model_stats", m.ModelStats(12, [
            m.ModelStat("identity", 1, 0, 0, 0, 0, 0, 0, [], 0, 0, 0),
            m.ModelStat("mlp", 2, 3, 1600, 1, 4, 2, 391, [[1, 77], [8, 73], [64, 2]], 233934,
                        164254, 68577, bad_input=5)])),
        frame("draining", m.Draining(10000)),
        frame("health", m.Health(13)),
        frame("health_report", m.HealthReport(13, False, False, "model 'slow' has run one "
                                              "forward pass for 95 s", [
            m.ModelHealth("mlp", 1, True, 0, 0),
            m.ModelHealth("slow", 4, False, 7, 95021)])),
        desc("request_one_input", "request_descriptor",
             RequestDescriptor("identity", 0, [TensorRef("x", "f32", [2, 3], 64, 24)])),
        desc("request_high_priority", "request_descriptor",
             RequestDescriptor("mlp", 5000, [TensorRef("x", "f32", [1, 16], 64, 64)],
                               priority=1)),
        desc("request_many_inputs", "request_descriptor",
             RequestDescriptor("bert", 250000, [
                 TensorRef("ids", "i64", [1, 128], 128, 1024),
                 TensorRef("mask", "bool", [1, 128], 1152, 128),
                 TensorRef("text", "bytes", [2], 1280, 19),
                 TensorRef("big", "bf16", [70000], 1344, 140000),
                 TensorRef("scalar", "f64", [], 141376, 8)])),
        desc("response_outputs", "response_descriptor",
             ResponseDescriptor(outputs=[TensorRef("y", "f32", [2, 4], 64, 32)])),
        desc("response_error", "response_descriptor",
             ResponseDescriptor(error=ErrorInfo(5, "BAD_INPUT", "model 'mlp' input 'x': got "
                                                "shape [2, 15], the model takes x: f32 [?, 16]"))),
        desc("response_error_fields", "response_descriptor",
             ResponseDescriptor(error=ErrorInfo(5, "BAD_INPUT", "input 'image' item 1: not a "
                                                "decodable PNG/JPEG/WEBP image (truncated)",
                                                input="image", item=1))),
        desc("response_error_limit", "response_descriptor",
             ResponseDescriptor(error=ErrorInfo(5, "BAD_INPUT", "input 'image' item 0: 8000x7999 "
                                                "pixels, the model takes at most 16777216 "
                                                "(limits.max_pixels)", input="image", item=0,
                                                limit=16777216))),
    ]
    for name, h in (("record_header_request", RecordHeader(192, KIND_REQUEST, 42, 37)),
                    ("record_header_pad", RecordHeader(2048, KIND_PAD, 0, 0)),
                    ("record_header_response", RecordHeader(1 << 20, KIND_RESPONSE,
                                                            (1 << 64) - 1, 65535))):
        out.append({"name": name, "kind": "record_header", "hex": h.pack().hex(),
                    "value": {"record_len": h.record_len, "kind": h.kind,
                              "request_id": h.request_id, "desc_len": h.desc_len}})
    return out


def ring_image():
    """A 4096 + 65536 + 65536 byte segment: see SPEC §8."""
    cap = 65536
    buf = bytearray(HEADER_SIZE + 2 * cap)
    mv = memoryview(buf)
    write_header(mv, cap, cap)
    req_off, resp_off = HEADER_SIZE, HEADER_SIZE + cap
    described = {"segment_size": len(buf), "request_ring": {}, "response_ring": {}}

    def put(ring_off, pos, kind, rid, d, tensors):
        dbytes = encode_descriptor(d) if d is not None else b""
        refs = [] if d is None else (d.inputs if isinstance(d, RequestDescriptor)
                                     else (d.outputs or []))
        assert all(r.offset >= 24 + len(dbytes) for r in refs), \
            "tensor bytes must not overlap the descriptor"
        end = max([r.offset + r.nbytes for r in refs] + [24 + len(dbytes)])
        n = (end + 63) & ~63
        at = ring_off + (pos % cap)
        RecordHeader(n, kind, rid, len(dbytes)).pack_into(mv, at)
        mv[at + 24:at + 24 + len(dbytes)] = dbytes
        for r, data in zip(refs, tensors):
            mv[at + r.offset:at + r.offset + r.nbytes] = data
        rec = {"position": pos, "segment_offset": at, "record_len": n, "kind": kind,
               "request_id": rid, "desc_len": len(dbytes)}
        if d is not None:
            rec["descriptor"] = to_wire(d)
            rec["tensors"] = [data.hex() for data in tensors]
        return n, rec

    x = struct.pack("<4f", 1.0, -2.0, 0.5, 3.25)
    ids = struct.pack("<6q", 101, 2023, 1, -1, 0, 7)
    text = struct.pack("<2I", 5, 2) + b"hello" + b"ok"
    start = cap + 63488  # the ring went round once; everything before `start` is released
    recs = []
    pos = start
    n, r = put(req_off, pos, KIND_REQUEST, 7,
               RequestDescriptor("identity", 0, [TensorRef("x", "f32", [4], 128, 16)]), [x])
    recs.append(r)
    pos += n
    pad = cap - (pos % cap)
    RecordHeader(pad, KIND_PAD, 0, 0).pack_into(mv, req_off + pos % cap)
    recs.append({"position": pos, "segment_offset": req_off + pos % cap, "record_len": pad,
                 "kind": KIND_PAD, "request_id": 0, "desc_len": 0})
    pos += pad
    # Make the second record bigger than the space left before the end, so it must wrap.
    assert pad < 2304
    n, r = put(req_off, pos, KIND_REQUEST, 8,
               RequestDescriptor("embed", 1500, [
                   TensorRef("ids", "i64", [2, 3], 256, 48),
                   TensorRef("text", "bytes", [2], 320, len(text)),
                   TensorRef("pad", "u8", [2048], 384, 2048)]),
               [ids, text, bytes(range(256)) * 8])
    recs.append(r)
    pos += n
    struct.pack_into("<Q", mv, REQ_CONTROL + 0, pos)     # tail
    struct.pack_into("<Q", mv, REQ_CONTROL + 64, start)  # head
    described["request_ring"] = {"head": start, "tail": pos, "records": recs}

    y = struct.pack("<4f", 1.0, -2.0, 0.5, 3.25)
    n, r = put(resp_off, 0, KIND_RESPONSE, 7,
               ResponseDescriptor(outputs=[TensorRef("y", "f32", [4], 128, 16)]), [y])
    struct.pack_into("<Q", mv, RESP_CONTROL + 0, n)
    struct.pack_into("<I", mv, RESP_CONTROL + 72, 1)  # the client sleeps, waiting for data
    described["response_ring"] = {"head": 0, "tail": n, "consumer_waiting": 1, "records": [r]}
    return bytes(buf), described


def main():
    with open(os.path.join(HERE, "vectors.json"), "w") as f:
        json.dump(cases(), f, indent=1)
        f.write("\n")
    img, described = ring_image()
    with open(os.path.join(HERE, "ring_image.bin"), "wb") as f:
        f.write(img)
    with open(os.path.join(HERE, "ring_image.json"), "w") as f:
        json.dump(described, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
