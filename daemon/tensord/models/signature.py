"""Model signatures: declared inputs and outputs, and the checks against them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..contract.dtypes import ANY, DTYPES, ByteStrings, from_torch, numel
from ..contract.errors import BadInputError, ModelFailedError
from ..contract.messages import TensorSpec

Value = torch.Tensor | ByteStrings


@dataclass(frozen=True)
class Spec:
    name: str
    dtype: str  # a wire dtype or "any"
    shape: tuple[int, ...] | None  # -1 = any size; None = any rank
    meaning: str = ""  # what the values are (SPEC §2.4 tensor spec), e.g. "image", "text"

    @classmethod
    def parse(cls, d: dict, what: str) -> Spec:
        try:
            name, dtype = d["name"], d["dtype"]
        except KeyError as e:
            raise ValueError(f"{what}: missing {e.args[0]!r}") from None
        if dtype != ANY and dtype not in DTYPES:
            raise ValueError(f"{what} {name!r}: unknown dtype {dtype!r}")
        shape = d.get("shape")
        if shape is not None:
            if not all(isinstance(x, int) and x >= -1 for x in shape):
                raise ValueError(f"{what} {name!r}: shape {shape} must hold sizes or -1")
            shape = tuple(shape)
        meaning = d.get("meaning", "")
        if not isinstance(meaning, str):
            raise ValueError(f"{what} {name!r}: meaning must be a string")
        return cls(name, dtype, shape, meaning)

    def wire(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, None if self.shape is None else list(self.shape),
                          self.meaning)

    def describe(self) -> str:
        shape = "any shape" if self.shape is None else \
            "[" + ", ".join("?" if d < 0 else str(d) for d in self.shape) + "]"
        return f"{self.name}: {self.dtype} {shape}"

    def accepts(self, dtype: str, shape: Sequence[int]) -> str | None:
        """None when a tensor of `dtype` and `shape` fits; otherwise why not."""
        if self.dtype != ANY and dtype != self.dtype:
            return f"dtype {dtype}, the model takes {self.dtype}"
        if self.shape is not None:
            if len(shape) != len(self.shape):
                return f"rank {len(shape)} (shape {list(shape)}), the model takes {self.describe()}"
            for got, want in zip(shape, self.shape):
                if want >= 0 and got != want:
                    return f"shape {list(shape)}, the model takes {self.describe()}"
        return None


@dataclass(frozen=True)
class Signature:
    inputs: tuple[Spec, ...]
    outputs: tuple[Spec, ...]
    max_batch: int = 0  # most rows (dimension 0) per request, checked per request; 0 = any

    def order_inputs(self, model: str, refs: Sequence) -> list[int]:
        """Check request tensor refs against the inputs; return ref indexes in model order."""
        by_name = {}
        for i, r in enumerate(refs):
            if r.name in by_name:
                raise BadInputError(f"input {r.name!r} is given twice", input=r.name)
            by_name[r.name] = i
        want = [s.name for s in self.inputs]
        if sorted(by_name) != sorted(want):
            raise BadInputError(
                f"model {model!r} takes inputs {want}, the request has {list(by_name)}"
            )
        order = []
        for spec in self.inputs:
            i = by_name[spec.name]
            why = spec.accepts(refs[i].dtype, refs[i].shape)
            if why:
                raise BadInputError(f"model {model!r} input {spec.name!r}: got {why}",
                                    input=spec.name)
            order.append(i)
        if self.max_batch and refs and refs[order[0]].shape and \
                refs[order[0]].shape[0] > self.max_batch:
            raise BadInputError(f"model {model!r} takes at most {self.max_batch} items per "
                                f"request (limits.max_batch), the request has "
                                f"{refs[order[0]].shape[0]}", input=refs[order[0]].name,
                                limit=self.max_batch)
        return order

    def check_outputs(self, model: str, outputs: Sequence[Value]) -> list[str]:
        """Check what the model returned against its declared outputs; returns their dtypes."""
        if len(outputs) != len(self.outputs):
            raise ModelFailedError(
                f"model {model!r} returned {len(outputs)} outputs, its signature declares "
                f"{len(self.outputs)} ({', '.join(s.describe() for s in self.outputs)})"
            )
        dtypes = []
        for spec, v in zip(self.outputs, outputs):
            if isinstance(v, ByteStrings):
                dtype, shape = "bytes", v.shape
                if len(v) != numel(shape) or not v.all_bytes():
                    raise ModelFailedError(
                        f"model {model!r} output {spec.name!r}: a bytes tensor of shape "
                        f"{list(shape)} needs {numel(shape)} items of type bytes")
            elif isinstance(v, torch.Tensor):
                try:
                    dtype = from_torch(v.dtype).name
                except BadInputError:
                    raise ModelFailedError(
                        f"model {model!r} output {spec.name!r} has torch dtype {v.dtype}, "
                        "which the protocol cannot carry") from None
                shape = tuple(v.shape)
            else:
                raise ModelFailedError(
                    f"model {model!r} output {spec.name!r} is a {type(v).__name__}, "
                    "not a tensor"
                )
            why = spec.accepts(dtype, shape)
            if why:
                raise ModelFailedError(
                    f"model {model!r} output {spec.name!r} does not match its signature: {why}"
                )
            dtypes.append(dtype)
        return dtypes


def match_outputs(model: str, out, specs: Sequence[Spec]) -> list:
    """What a module returned, as a list in declared output order. A mapping (a dict, or a
    Hugging Face ModelOutput) is matched by the declared names; a tensor or a sequence must
    have exactly as many outputs as declared: nothing is dropped silently."""
    if isinstance(out, Mapping):
        missing = [s.name for s in specs if s.name not in out or out[s.name] is None]
        if missing:
            raise ModelFailedError(
                f"model {model!r} returned a mapping with keys {list(out)}, without the "
                f"declared output(s) {missing}: name the outputs in the config after its keys")
        return [out[s.name] for s in specs]
    outs = [out] if isinstance(out, (torch.Tensor, ByteStrings)) else list(out)
    if len(outs) != len(specs):
        raise ModelFailedError(
            f"model {model!r} returned {len(outs)} outputs, its signature declares "
            f"{len(specs)} ({', '.join(s.describe() for s in specs)})")
    return outs
