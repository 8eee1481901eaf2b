"""Contract-level checks that need no daemon: framing, descriptor and config limits."""

from __future__ import annotations

import logging
import socket
import struct

import msgpack
import pytest
import torch

from tensord.client import Client
from tensord.config import ConfigError, model_config
from tensord.contract.descriptors import MAX_TENSORS, decode_response, encode_descriptor
from tensord.contract.errors import BadRequestError, ProtocolError
from tensord.contract.frames import read_frame
from tensord.models.loader import resolve_precision


def _frame(value) -> bytes:
    body = msgpack.packb(value)
    return struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("rid,echoed", [(7, 7), ((1 << 64) - 1, (1 << 64) - 1), (0, 0),
                                        (-3, 0), (True, 0), ("7", 0)])
def test_bad_message_echoes_only_a_valid_id(rid, echoed):
    a, b = socket.socketpair()
    with a, b:
        a.sendall(_frame({"type": "unload", "id": rid, "name": 5}))  # name is mistyped
        with pytest.raises(ProtocolError) as e:
            read_frame(b)
        assert e.value.request_id == echoed


def test_response_with_more_than_64_outputs_is_refused():
    refs = [{"name": f"o{i}", "dtype": "f32", "shape": [1], "offset": 64 * (i + 1),
             "nbytes": 4} for i in range(MAX_TENSORS + 1)]
    with pytest.raises(BadRequestError, match="at most 64"):
        decode_response(msgpack.packb({"outputs": refs}))
    assert len(decode_response(msgpack.packb({"outputs": refs[:MAX_TENSORS]})).outputs) == 64


def test_config_declaring_more_than_64_outputs_is_refused():
    outs = [{"name": f"o{i}", "dtype": "f32"} for i in range(MAX_TENSORS + 1)]
    with pytest.raises(ConfigError, match="65 outputs.*at most 64"):
        model_config({"name": "m", "source": "handler", "handler": "a:B", "outputs": outs},
                     "/", "models[0]")


def test_client_refuses_more_than_64_inputs_before_sending(daemon):
    with Client(daemon.path) as c:
        with pytest.raises(BadRequestError, match="65 inputs; a request carries at most 64"):
            c.infer("identity", {f"x{i}": torch.ones(1) for i in range(MAX_TENSORS + 1)})
        c.ping()


def test_precision_auto_is_fp32_on_cpu_fp16_on_cuda(caplog):
    assert model_config({"name": "m", "source": "handler", "handler": "a:B"}, "/",
                        "m").precision == "auto"
    assert resolve_precision("auto", torch.device("cpu"), "m") == torch.float32
    assert resolve_precision("auto", torch.device("cuda:0"), "m") == torch.float16
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("fp32", torch.device("cpu"), "m") == torch.float32
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("fp16", torch.device("cpu"), "m") == torch.float16
    assert "slower than fp32" in caplog.text


def test_encode_descriptor_round_trip_keeps_64_outputs():
    refs = [{"name": f"o{i}", "dtype": "u8", "shape": [0], "offset": 64, "nbytes": 0}
            for i in range(MAX_TENSORS)]
    desc = decode_response(msgpack.packb({"outputs": refs}))
    assert decode_response(encode_descriptor(desc)) == desc
