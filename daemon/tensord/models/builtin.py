"""Models every daemon serves without a config, so it is useful at once."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .base import BatchPolicy, Model
from .modules import ModuleModel
from .signature import Signature, Spec, Value


class Identity(Model):
    """Returns its input unchanged: any dtype, any shape. The transport's own cost, measured."""

    name = "identity"
    inline = True  # no tensor math: a hand-off to the compute thread would be pure overhead
    idempotent = True
    signature = Signature(inputs=(Spec("x", "any", None),), outputs=(Spec("y", "any", None),))

    def forward(self, inputs: Sequence[Value]) -> Sequence[Value]:
        return list(inputs)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, 64)
        self.l2 = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


MLP_SIGNATURE = Signature(inputs=(Spec("x", "f32", (-1, 16)),),
                          outputs=(Spec("y", "f32", (-1, 4)),))


def build_mlp() -> torch.jit.ScriptModule:
    """A small scripted MLP (16 -> 64 -> 4) with fixed weights: the same numbers in every
    process, so clients can check results against `reference_mlp`."""
    g = torch.Generator().manual_seed(20261125)
    m = _MLP()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.25)
    with warnings.catch_warnings():
        # torch 2.10+ deprecates TorchScript in favour of torch.export; the daemon still serves
        # TorchScript files, so the built-in model exercises that path.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(m.eval())


def builtin_models() -> list[Model]:
    mlp = ModuleModel("mlp", build_mlp(), MLP_SIGNATURE, kind="torchscript")
    mlp.idempotent = True  # a pure function of its input
    # Rows are independent: requests that queue up while a batch runs join the next one.
    mlp.batching = BatchPolicy(max_batch_size=64)
    return [Identity(), mlp]
