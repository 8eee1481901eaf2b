"""Models backed by a TorchScript module (a `torch.jit.load`ed file or a scripted module)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..contract.dtypes import ByteStrings
from ..contract.errors import BadInputError
from .base import Model
from .signature import Signature, Value


class TorchScriptModel(Model):
    def __init__(self, name: str, module: torch.jit.ScriptModule, signature: Signature,
                 device: str = "cpu"):
        self.name = name
        self.module = module.eval()
        self.signature = signature
        self.device = device

    @classmethod
    def load(cls, name: str, path: str, signature: Signature, device: str = "cpu"):
        return cls(name, torch.jit.load(path, map_location=device), signature, device)

    def forward(self, inputs: Sequence[Value]) -> Sequence[Value]:
        if any(isinstance(v, ByteStrings) for v in inputs):
            raise BadInputError(f"model {self.name!r} is TorchScript and takes no bytes tensors")
        out = self.module(*inputs)
        if isinstance(out, torch.Tensor):
            return [out]
        return list(out)
