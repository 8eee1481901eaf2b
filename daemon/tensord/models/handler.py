"""Python handler models: for models that need Python around them (tokenizers, image decoding).

Image classification, text classification and text embeddings need no handler of your own:
the built-in handlers (`source = "vision.classify"`, `"text.classify"`, `"text.embed"`,
models/builtin_handlers/) serve an exported network from configuration alone.

A handler is a class named in the config as `handler = "package.module:Class"`:

    class Embedder(Handler):
        inputs = (Spec("text", "bytes", (-1,)),)
        outputs = (Spec("embedding", "f32", (-1, 384)),)

        def load(self, ctx):                 # once, before the model serves (then warm-up)
            self.net = build().to(ctx.device, ctx.dtype).eval()
        def preprocess(self, inputs):        # optional: wire values -> what forward takes
            ...
        def forward(self, batch):            # the model itself, under torch.inference_mode()
            ...
        def postprocess(self, outputs):      # optional: -> list of output tensors, in order
            ...

Raise `BadInputError` for input the model cannot take (not an image, not UTF-8): the caller
gets BAD_INPUT with your message. Anything else a handler raises reaches the caller as
MODEL_FAILED. Inputs may view shared memory that is reused once `forward` returns: copy what
you keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import Model
from .signature import Signature, Spec, Value, match_outputs


@dataclass
class LoadContext:
    device: torch.device
    dtype: torch.dtype  # the configured precision for floating-point weights and activations
    options: dict[str, Any] = field(default_factory=dict)  # the model's `options` config table


class Handler:
    inputs: tuple[Spec, ...] = ()
    outputs: tuple[Spec, ...] = ()

    def load(self, ctx: LoadContext) -> None:
        """Load weights; called once before the model serves."""

    def preprocess(self, inputs: list[Value]) -> Any:
        return inputs

    def forward(self, batch: Any) -> Any:
        raise NotImplementedError

    def postprocess(self, outputs: Any) -> Sequence[Value]:
        return outputs


class HandlerModel(Model):
    kind = "handler"

    def __init__(self, name: str, handler: Handler, signature: Signature, device: str):
        self.name = name
        self.handler = handler
        self.signature = signature
        self.device = device

    def forward(self, inputs: Sequence[Value]) -> Sequence[Value]:
        h = self.handler
        out = h.postprocess(h.forward(h.preprocess(list(inputs))))
        return match_outputs(self.name, out, self.signature.outputs)
