"""Python handler models through the daemon: options, errors a caller can act on."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from conftest import start_daemon

from tensord.client import Client
from tensord.contract.errors import BadInputError, ModelFailedError

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def handler_daemon(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("PYTHONPATH", str(HERE) + os.pathsep +
                              os.environ.get("PYTHONPATH", ""))
    d = start_daemon(tmp_path_factory.mktemp("handlers"), config="""
[[models]]
name = "triple"
source = "handler"
handler = "handlers_for_tests:Doubler"
[models.options]
factor = 3.0
""")
    yield d
    assert d.stop() == 0


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_handler_serves_with_its_options(handler_daemon):
    with Client(handler_daemon.path) as c:
        y = c.infer("triple", {"x": torch.tensor([1.0, 2.0])})["y"]
        assert torch.equal(y, torch.tensor([3.0, 6.0]))
        info = {m.name: m for m in c.models()}["triple"]
        assert [(s.name, s.dtype, s.shape) for s in info.inputs] == [("x", "f32", [-1])]


def wait_for_log(d, text: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while text not in d.logs():
        assert time.monotonic() < end, f"{text!r} not in the daemon's log:\n{d.logs()}"
        time.sleep(0.02)


def test_handler_errors_reach_the_caller_and_the_model_keeps_serving(handler_daemon):
    with Client(handler_daemon.path) as c:
        with pytest.raises(BadInputError, match="must not be negative"):
            c.infer("triple", {"x": torch.tensor([-1.0])})
        with pytest.raises(ModelFailedError, match="'triple' failed on this request") as e:
            c.infer("triple", {"x": torch.tensor([1e7])})
        # Python's exception goes to the daemon's log, not to the caller (issue 17 item 4).
        assert "RuntimeError" not in e.value.message and "overflow" not in e.value.message
        ref = e.value.message.rsplit("ref ", 1)[1].rstrip(")")
        wait_for_log(handler_daemon, f"raised RuntimeError: overflow in the model (ref {ref})")
        assert torch.equal(c.infer("triple", {"x": torch.tensor([1.0])})["y"],
                           torch.tensor([3.0]))


def test_bytes_output_of_str_items_is_refused_not_sent(handler_daemon):
    with Client(handler_daemon.path) as c:
        c.load("strs", {"source": "handler", "handler": "handlers_for_tests:StrNotBytes",
                        "warmup": False})
        with pytest.raises(ModelFailedError, match="items of type bytes"):
            c.infer("strs", {"x": torch.tensor([1.0, 2.0])})
        assert torch.equal(c.infer("triple", {"x": torch.tensor([1.0])})["y"],
                           torch.tensor([3.0]))
        c.unload("strs")


@pytest.mark.parametrize("handler,msg", [
    ("handlers_for_tests:WrongShape", "does not match its signature"),
    ("handlers_for_tests:FailsToLoad", "FileNotFoundError: weights.bin is missing"),
    ("handlers_for_tests:NotAHandler", "not a tensord Handler"),
    ("handlers_for_tests:Missing", "cannot import handler"),
])
def test_broken_handlers_fail_their_load_with_the_reason(handler_daemon, handler, msg):
    with Client(handler_daemon.path) as c:
        with pytest.raises(ModelFailedError, match=msg):
            c.load("broken", {"source": "handler", "handler": handler})
        assert "broken" not in [m.name for m in c.models()]
        assert torch.equal(c.infer("triple", {"x": torch.tensor([2.0])})["y"],
                           torch.tensor([6.0]))


def test_unknown_handler_module_fails_daemon_start_with_a_reason(tmp_path):
    with pytest.raises(RuntimeError, match="cannot import handler nope.nope:X"):
        start_daemon(tmp_path, config="""
[[models]]
name = "m"
source = "handler"
handler = "nope.nope:X"
""")
