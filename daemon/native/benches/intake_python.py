"""CPU ns per request of the Python intake path (contract decode_request + check_refs + the
model signature's order_inputs) and of the native one called from Python, on the descriptor
the Go client sends for a 4 KiB f32 `identity` request. Printed, never asserted; run with the
daemon's venv: `.venv/bin/python daemon/native/benches/intake_python.py`. `cargo bench` (in
daemon/native) times the native steps without Python around them."""

from __future__ import annotations

import mmap
import time

import msgpack

from tensord import _core
from tensord.contract.descriptors import check_refs, decode_request
from tensord.contract.layout import HEADER_SIZE, KIND_REQUEST, REQ_CONTROL, write_header
from tensord.models.signature import Signature, Spec
from tensord.transport.ring import RingConsumer, RingControl, RingProducer, Shm

DESC = msgpack.packb({"model": "identity", "timeout_us": 0, "inputs": [
    {"name": "x", "dtype": "f32", "shape": [1024], "offset": 128, "nbytes": 4096}]})
START, RECORD = 128, 128 + 4096


def best(n: int, f) -> float:
    """CPU ns per call of f, best of 20 rounds (the machine is shared: wall time would count
    other processes' turns)."""
    for _ in range(n // 10):
        f()
    out = float("inf")
    for _ in range(20):
        t = time.thread_time_ns()
        for _ in range(n // 20):
            f()
        out = min(out, (time.thread_time_ns() - t) / (n // 20))
    return out


def main() -> None:
    sig = Signature((Spec("x", "any", None),), ())
    native_sig = _core.Signature("identity", [("x", "any", None)])

    def python_path():
        d = decode_request(DESC)
        check_refs(d.inputs, START, RECORD, "input")
        sig.order_inputs("identity", d.inputs)

    def native_decode():
        _core.decode_request(DESC, START, RECORD)

    def native_intake():
        native_sig.intake(DESC, START, RECORD)

    # The ring: the daemon's RingConsumer (poll + release through the Python wrapper, as
    # session.take and finish do) over records a RingProducer wrote.
    cap = 1 << 16
    mm = mmap.mmap(-1, HEADER_SIZE + 2 * cap)
    write_header(memoryview(mm), cap, cap)
    shm = Shm(mm)
    ctl = RingControl(shm, REQ_CONTROL)
    prod, cons = RingProducer(ctl, HEADER_SIZE, cap), RingConsumer(ctl, HEADER_SIZE, cap,
                                                                    KIND_REQUEST)
    per_record = float("inf")
    for _ in range(200):
        for i in range(256):
            off = prod.try_reserve(192)
            shm.write_record(off, KIND_REQUEST, i, 192, DESC)
            prod.publish()
        t = time.thread_time_ns()
        for _ in range(256):
            recs = cons.poll(1)
            while not recs:  # a PAD at the wrap counts as one read
                recs = cons.poll(1)
            cons.release(recs[0])
        per_record = min(per_record, (time.thread_time_ns() - t) / 256)
    print(f"RingConsumer.poll(1) + release from Python, one record: {per_record:.0f} ns")
    shm.close()

    print(f"descriptor: {len(DESC)} bytes")
    for what, f in (("Python decode_request + check_refs + order_inputs", python_path),
                    ("native _core.decode_request, called from Python", native_decode),
                    ("native Signature.intake (decode + order), from Python", native_intake)):
        print(f"{what}: {best(200_000, f):.0f} ns")


if __name__ == "__main__":
    main()
