"""Pipelining on one session of the Python client, for tests: publish requests without
waiting for their answers (the client's infer() waits for each), then read the responses."""

from __future__ import annotations

import time

import torch

from tensord.client import ByteStrings, Client
from tensord.contract.descriptors import RequestDescriptor, TensorRef, encode_descriptor
from tensord.contract.layout import KIND_REQUEST
from tensord.transport import records


def publish(c: Client, model: str, rid: int, x: torch.Tensor | ByteStrings, dtype: str,
            priority: int = 0, wait: float = 60) -> None:
    """Publish a request without waiting for its answer (pipelining on one session); the
    request ring must have room for it within `wait` seconds (0: at once)."""
    n_bytes = records.nbytes(x)
    shape = list(x.shape)

    def encode(offsets):
        return encode_descriptor(RequestDescriptor(model, 0, [
            TensorRef("x", dtype, shape, offsets[0], n_bytes)], priority or None))

    n, desc, offsets = records.plan([n_bytes], encode)
    end = time.monotonic() + wait
    while (off := c.seg.requests.try_reserve(n)) is None:
        assert time.monotonic() < end, f"no request-ring space for {wait} s"
        time.sleep(0.001)
    records.write(c.seg, off, KIND_REQUEST, rid, n, desc, [(offsets[0], n_bytes, x)])
    c.seg.requests.publish()
    c._req_data.notify()


def responses(c: Client, ids: set[int], timeout: float = 60) -> dict[int, object]:
    """Read the responses of published requests: rid -> outputs dict or the error."""
    got: dict[int, object] = {}
    end = time.monotonic() + timeout
    while len(got) < len(ids):
        assert time.monotonic() < end, f"no response for {sorted(ids - set(got))}"
        for rec in c.seg.responses.poll():
            try:
                got[rec.request_id] = c._read_response(rec)
            except Exception as e:  # an error response: recorded for the test to check
                got[rec.request_id] = e
            if c.seg.responses.release(rec):
                c._resp_space.notify()
        time.sleep(0.002)
    assert set(got) == ids, sorted(set(got) ^ ids)
    return got
