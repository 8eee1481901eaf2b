"""`tensord export`: turn a Python model into a file the daemon serves, and prove it is the
same model before saving it.

    tensord export mypkg.models:build --input x:f32:1,3,224,224 -o model.pt

The factory is called with no arguments and returns a torch.nn.Module. The module is traced
(default) or scripted, or exported with torch.export (`--method export`, a .pt2 file); the
exported model and the original run on the example input and on a second random input, and
their outputs must agree within the tolerance or nothing is written.
"""

from __future__ import annotations

import argparse
import importlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .contract.dtypes import DTYPES


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        """`name:dtype:d1,d2,...`, e.g. `x:f32:1,3,224,224`."""
        try:
            name, dtype, dims = text.split(":")
            shape = tuple(int(d) for d in dims.split(",") if d)
        except ValueError:
            raise ValueError(f"--input {text!r}: write name:dtype:d1,d2,... "
                             "(e.g. x:f32:1,3,224,224)") from None
        if dtype not in DTYPES or DTYPES[dtype].torch_dtype is None:
            raise ValueError(f"--input {text!r}: dtype must be a numeric wire dtype "
                             f"({', '.join(n for n, d in DTYPES.items() if d.torch_dtype)})")
        if any(d < 1 for d in shape):
            raise ValueError(f"--input {text!r}: every dimension must be at least 1")
        return cls(name, dtype, shape)

    def example(self, gen: torch.Generator) -> torch.Tensor:
        dt = DTYPES[self.dtype].torch_dtype
        if dt.is_floating_point:
            return torch.randn(self.shape, generator=gen).to(dt)
        if dt == torch.bool:
            return torch.randint(0, 2, self.shape, generator=gen).bool()
        return torch.randint(0, 100, self.shape, generator=gen).to(dt)


class ExportMismatch(Exception):
    pass


def load_factory(ref: str) -> torch.nn.Module:
    mod, _, attr = ref.partition(":")
    if not attr:
        raise ValueError(f"{ref!r}: write module:factory (e.g. mypkg.models:build)")
    obj = getattr(importlib.import_module(mod), attr)
    model = obj() if callable(obj) and not isinstance(obj, torch.nn.Module) else obj
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{ref} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def export(model: torch.nn.Module, inputs: list[InputSpec], method: str, out: str,
           rtol: float = 1e-4, atol: float = 1e-5, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    example = tuple(s.example(gen) for s in inputs)
    # The second input flips float signs so a branch on the data's sign, baked in by tracing,
    # shows up as a mismatch.
    second = tuple(-x if x.is_floating_point() else x for x in
                   (s.example(gen) for s in inputs))
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript deprecation notices
        names = None
        first = model(*example)
        if isinstance(first, Mapping):
            # A dict-like output (a Hugging Face ModelOutput) cannot be saved as such: its class
            # must be registered with torch's pytree in every process that loads the file, and
            # tracing refuses dicts. Save a tuple in key order instead; the names are printed
            # for the config's `outputs`.
            names = [k for k, v in first.items() if isinstance(v, torch.Tensor)]
            model = _TupleOutputs(model, names)
        if method == "trace":
            exported = torch.jit.trace(model, example)
        elif method == "script":
            exported = torch.jit.script(model)
        elif method == "export":
            # The daemon batches and callers send any batch size: keep dim 0 symbolic instead
            # of specialising the program to the example's batch.
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            dynamic = tuple({0: batch} if len(s.shape) else None for s in inputs)
            if isinstance(model, _TupleOutputs):
                dynamic = (dynamic,)  # its forward takes *args: one entry holding them all
            program = torch.export.export(model, example, dynamic_shapes=dynamic)
            exported = program.module()
        else:
            raise ValueError(f"unknown method {method!r}: trace, script or export")
        for name, args in (("example input", example), ("second random input", second)):
            want, got = _flat(model(*args)), _flat(exported(*args))
            if len(want) != len(got):
                raise ExportMismatch(f"on the {name}: the original returns {len(want)} "
                                     f"outputs, the exported model {len(got)}")
            for i, (w, g) in enumerate(zip(want, got)):
                try:
                    torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
                except AssertionError as e:
                    raise ExportMismatch(f"on the {name}, output {i} differs: {e}") from None
        if method == "export":
            torch.export.save(program, out)
        else:
            exported.save(out)
    return {"path": out, "method": method, "names": names,
            "outputs": [tuple(t.shape) for t in _flat(model(*example))]}


class _TupleOutputs(torch.nn.Module):
    """Returns the named tensors of a module's mapping output as a plain tuple."""

    def __init__(self, inner: torch.nn.Module, names: list[str]):
        super().__init__()
        self.inner = inner
        self.names = names

    def forward(self, *args):
        out = self.inner(*args)
        return tuple(out[k] for k in self.names)


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for _, v in sorted(out.items())]
    return [t for o in out for t in _flat(o)]


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a Python model to TorchScript or torch.export",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("factory", help="module:factory returning a torch.nn.Module")
    p.add_argument("--input", action="append", required=True, metavar="NAME:DTYPE:SHAPE",
                   help="example input, repeat for each (e.g. x:f32:1,3,224,224)")
    p.add_argument("--method", choices=["trace", "script", "export"], default="trace")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-5)


def run(args) -> int:
    try:
        inputs = [InputSpec.parse(t) for t in args.input]
        model = load_factory(args.factory)
        info = export(model, inputs, args.method, args.output, args.rtol, args.atol)
    except (ValueError, ImportError, AttributeError, ExportMismatch) as e:
        print(f"tensord export: {e}")
        return 1
    except Exception as e:  # torch's tracers and exporters raise many types
        hint = ""
        if args.method == "export" and any(s.shape[:1] == (1,) for s in inputs):
            hint = (" (torch.export treats a size-1 batch as a constant: give the example "
                    "input a batch of at least 2)")
        print(f"tensord export: {args.method} failed: {type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}{hint}")
        return 1
    named = ""
    if info["names"]:
        named = (f"; the model returns a mapping, saved as the tuple {info['names']}: declare "
                 "those outputs, in that order, in the model's config")
    print(f"wrote {info['path']} ({info['method']}); outputs on the example: {info['outputs']}; "
          f"outputs match the original on 2 inputs{named}")
    return 0
