"""Models that are one torch module: a TorchScript file, a `torch.export` program, or a module
built in process. The daemon places them on their device, in their precision."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..contract.dtypes import DTYPES, ByteStrings
from ..contract.errors import BadInputError
from .base import Model
from .signature import Signature, Spec, Value, match_outputs

CPU = torch.device("cpu")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModuleModel(Model):
    def __init__(self, name: str, module, signature: Signature,
                 device: torch.device = CPU, precision: torch.dtype = torch.float32,
                 kind: str = "module"):
        self.name = name
        self.kind = kind
        self.signature = signature
        self.torch_device = device
        self.device = str(device)
        self.precision = precision
        if kind != "export":  # exported programs are inference graphs already and refuse eval()
            module = module.eval()
        if device.type != "cpu":
            module = module.to(device)
        if precision != torch.float32:
            module = module.to(precision)
        self.module = module

    def forward(self, inputs: Sequence[Value]) -> Sequence[Value]:
        xs = []
        on_cpu = self.torch_device.type == "cpu"
        for spec, x in zip(self.signature.inputs, inputs):
            if isinstance(x, ByteStrings):
                raise BadInputError(f"model {self.name!r} ({self.kind}) takes no bytes tensors; "
                                    f"input {spec.name!r} is one")
            if not on_cpu:
                # From page-locked memory this is an async copy on the worker's stream.
                x = x.to(self.torch_device, non_blocking=True)
            if x.is_floating_point() and x.dtype != self.precision:
                x = x.to(self.precision)
            xs.append(x)
        outs = match_outputs(self.name, self.module(*xs), self.signature.outputs)
        return [_declared(o, s) for o, s in zip(outs, self.signature.outputs)]



def _declared(out, spec: Spec):
    """Return floating outputs in the dtype the signature declares (fp16 compute, f32 answer)."""
    if not isinstance(out, torch.Tensor) or spec.dtype in ("any", "bytes"):
        return out
    want = DTYPES[spec.dtype].torch_dtype
    if out.dtype != want and out.is_floating_point() and want.is_floating_point:
        return out.to(want)
    return out


def load_torchscript(path: str, device: torch.device):
    return torch.jit.load(path, map_location=device)


def load_exported(path: str):
    return torch.export.load(path).module()
