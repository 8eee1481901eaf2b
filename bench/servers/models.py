"""The models every baseline serves: tensord's own built-in `identity` and `mlp`, run through
tensord's Executor (forward under inference_mode, output checks, contiguous CPU outputs) in the
server's request thread, so a baseline differs from tensord only in how tensors travel (and
pays no hand-off to a model worker: tensord runs tiny models in its dispatcher too)."""

from __future__ import annotations

import warnings

import torch

from tensord.contract.dtypes import from_torch, lookup
from tensord.models.builtin import builtin_models
from tensord.serving.executor import Executor

# torch.frombuffer on a read-only buffer (bytes from a protobuf or msgpack message) warns that
# writes would be undefined; the models never write their inputs.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

MODELS = {m.name: m for m in builtin_models()}


class UnknownModel(KeyError):
    pass


def tensor_from_buffer(buf, dtype: str, shape: list[int]) -> torch.Tensor:
    """A tensor viewing `buf` (no copy)."""
    dt = lookup(dtype)
    n = 1
    for d in shape:
        n *= d
    if n == 0:
        return torch.empty(shape, dtype=dt.torch_dtype)
    return torch.frombuffer(buf, dtype=dt.torch_dtype, count=n).view(shape)


def run(model_name: str, inputs: list[torch.Tensor]) -> list[tuple[str, str, torch.Tensor]]:
    """Run a model; returns (output name, wire dtype, contiguous CPU tensor) per output."""
    try:
        model = MODELS[model_name]
    except KeyError:
        raise UnknownModel(model_name) from None
    with torch.inference_mode():  # tensord's model workers run under it too
        outputs, dtypes = Executor.run(model, inputs)
    names = [s.name for s in model.signature.outputs]
    return list(zip(names, dtypes, outputs))


def wire_dtype(t: torch.Tensor) -> str:
    return from_torch(t.dtype).name


def warm_up() -> None:
    """One forward per model so the first timed request pays no lazy initialisation."""
    run("identity", [torch.zeros(4)])
    run("mlp", [torch.zeros(1, 16)])
