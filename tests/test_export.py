"""`tensord export`: exported files equal the original model, and the daemon serves them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tensord.client import Client
from tensord.contract.errors import ModelFailedError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import export_models  # noqa: E402


def run_export(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    return subprocess.run([sys.executable, "-m", "tensord", "export", *args], env=env,
                          capture_output=True, text=True)


SIG = {"inputs": [{"name": "x", "dtype": "f32", "shape": [-1, 3, 16, 16]}],
       "outputs": [{"name": "y", "dtype": "f32", "shape": [-1, 5]}]}


@pytest.mark.parametrize("method,source,suffix", [("trace", "torchscript", "pt"),
                                                  ("script", "torchscript", "pt"),
                                                  ("export", "export", "pt2")])
def test_export_then_serve(daemon, tmp_path, method, source, suffix):
    out = tmp_path / f"conv.{suffix}"
    r = run_export("export_models:conv", "--input", "x:f32:2,3,16,16", "--method", method,
                   "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "match the original" in r.stdout and out.exists()
    x = torch.randn(2, 3, 16, 16)
    want = export_models.conv()(x)
    with Client(daemon.path) as c:
        name = f"conv-{method}"
        c.load(name, {"source": source, "path": str(out), "device": "cpu", **SIG})
        got = c.infer(name, {"x": x})["y"]
        c.unload(name)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_trace_that_bakes_a_branch_is_refused_and_nothing_written(tmp_path):
    out = tmp_path / "branchy.pt"
    # seed 0's first example sums to one sign, the second random input to the other
    r = run_export("export_models:branchy", "--input", "x:f32:4", "-o", str(out))
    if r.returncode == 0:
        pytest.fail("tracing a data-dependent branch must be caught: " + r.stdout)
    assert "differs" in r.stdout and not out.exists()
    r = run_export("export_models:branchy", "--input", "x:f32:4", "--method", "script",
                   "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    m = torch.jit.load(str(out))
    for x in (torch.ones(4), -torch.ones(4)):
        assert torch.equal(m(x), export_models.branchy()(x))


@pytest.mark.parametrize("args,msg", [
    (["export_models:not_a_module", "--input", "x:f32:1"], "not a torch.nn.Module"),
    (["export_models:conv", "--input", "x:f32"], "name:dtype:d1,d2"),
    (["export_models:conv", "--input", "x:c64:1"], "numeric wire dtype"),
    (["export_models", "--input", "x:f32:1"], "module:factory"),
])
def test_bad_arguments_say_what_to_do(tmp_path, args, msg):
    r = run_export(*args, "-o", str(tmp_path / "m.pt"))
    assert r.returncode == 1 and msg in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("method,source,suffix", [("trace", "torchscript", "pt"),
                                                  ("export", "export", "pt2")])
def test_hugging_face_model_output_exports_and_serves(daemon, tmp_path, method, source, suffix):
    """A forward that returns a ModelOutput (a dict subclass) is saved as a tuple of its named
    tensors; a fresh daemon process loads it without transformers' pytree registrations."""
    pytest.importorskip("transformers")
    out = tmp_path / f"bert.{suffix}"
    r = run_export("export_models:bert_classifier", "--input", "input_ids:i64:2,8",
                   "--method", method, "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "['logits']" in r.stdout, r.stdout
    ids = torch.randint(0, 128, (3, 8))
    want = export_models.bert_classifier()(ids).logits
    sig = {"inputs": [{"name": "input_ids", "dtype": "i64", "shape": [-1, 8]}],
           "outputs": [{"name": "logits", "dtype": "f32", "shape": [-1, 3]}]}
    with Client(daemon.path) as c:
        c.load("bert", {"source": source, "path": str(out), "device": "cpu", **sig})
        got = c.infer("bert", {"input_ids": ids})["logits"]
        c.unload("bert")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_more_outputs_than_declared_fail_the_load_naming_both_counts(daemon, tmp_path):
    path = tmp_path / "two.pt"
    torch.jit.script(export_models.TwoOutputs()).save(str(path))
    sig = {"inputs": [{"name": "x", "dtype": "f32", "shape": [-1]}],
           "outputs": [{"name": "y", "dtype": "f32", "shape": [-1]}]}
    with Client(daemon.path) as c:
        with pytest.raises(ModelFailedError, match="returned 2 outputs, its signature declares 1"):
            c.load("two", {"source": "torchscript", "path": str(path), **sig})
        # without warm-up the request fails instead, with the same reason
        c.load("two", {"source": "torchscript", "path": str(path), "warmup": False, **sig})
        with pytest.raises(ModelFailedError, match="returned 2 outputs, its signature declares 1"):
            c.infer("two", {"x": torch.ones(3)})
        c.unload("two")
