"""What a service needs before production (issue 17): protocol 5's idempotent models and
error fields (with protocol 4 clients still served), one retry classification per error
code, and the Python client's reconnecting behaviour. Real daemons, real shared memory."""

from __future__ import annotations

import pytest
import torch

from tensord.client import Client
from tensord.contract.errors import (
    BadInputError,
    ErrorCode,
    OverloadedError,
    TooLargeError,
    retryable,
    safe_to_retry,
)


def test_models_say_whether_they_are_idempotent(daemon):
    with Client(daemon.path) as c:
        assert c.welcome.version == 5
        info = {m.name: m for m in c.models()}
        assert info["mlp"].idempotent is True and info["identity"].idempotent is True


def test_errors_name_the_input_and_the_limit(daemon):
    with Client(daemon.path) as c:
        with pytest.raises(BadInputError) as e:
            c.infer("mlp", {"x": torch.ones(2, 15)})
        assert e.value.input == "x" and e.value.item is None and e.value.limit is None
    with pytest.raises(TooLargeError) as e:  # a control `error`, fatal at the handshake
        Client(daemon.path, request_ring=1 << 31)
    assert e.value.limit == 1 << 30 and e.value.input is None and "max_ring" in e.value.message


def test_protocol_4_client_gets_protocol_4_messages(daemon):
    """A v5 daemon speaks 4 too: no `idempotent`, no error fields (SPEC §2.4 hello)."""
    with Client(daemon.path, max_version=4) as c:
        assert c.welcome.version == 4
        assert all(m.idempotent is None for m in c.models())
        with pytest.raises(BadInputError) as e:
            c.infer("mlp", {"x": torch.ones(2, 15)})
        assert e.value.input is None
        assert torch.equal(c.infer("identity", {"x": torch.arange(3.0)})["y"], torch.arange(3.0))
    with pytest.raises(TooLargeError) as e:
        Client(daemon.path, request_ring=1 << 31, max_version=4)
    assert e.value.limit is None


def test_retry_classification_is_a_property_of_the_code(daemon):
    """Bad input found by the client and by the daemon: both certainly did not run and
    neither is worth retrying; transient codes are (SPEC §6 "Worth retrying")."""
    with Client(daemon.path, request_ring=65536) as c:
        with pytest.raises(TooLargeError) as client_found:  # refused before it is written
            c.infer("identity", {"x": torch.zeros(1 << 16)})
        with pytest.raises(BadInputError) as daemon_found:
            c.infer("mlp", {"x": torch.ones(2, 15)})
    for e in (client_found.value, daemon_found.value):
        assert safe_to_retry(e) and not retryable(e)
    assert retryable(OverloadedError("queue full"))
    assert not safe_to_retry(BadInputError("x", code=ErrorCode.MODEL_FAILED))
