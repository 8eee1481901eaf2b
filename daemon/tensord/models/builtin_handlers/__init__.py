"""Built-in handlers: models served from configuration alone, with no Python to write.

    source = "vision.classify"   images (encoded files or pixels) -> top-k labels and scores
    source = "text.classify"     UTF-8 strings -> top-k labels and scores
    source = "text.embed"        UTF-8 strings -> pooled, normalized embeddings

Each wraps a network given by `path` (TorchScript or torch.export) or `module` (a Python
factory), with `labels` and `tokenizer` files where they apply; the rest is in
`[models.options]` (see vision.py and text.py). Their limits and the meaning of every tensor
are published in the model's metadata (SPEC §2.4).

The image and text libraries (Pillow, tokenizers) are imported only when such a model loads:
a daemon without them still serves everything else.
"""

from __future__ import annotations

import importlib

import torch

from ...config import ConfigError, ModelConfig
from ..handler import HandlerModel
from ..signature import Signature

BUILTIN_HANDLERS = {
    "vision.classify": ("vision", "VisionClassify", "pillow"),
    "text.classify": ("text", "TextClassify", "tokenizers"),
    "text.embed": ("text", "TextEmbed", "tokenizers"),
}


def build(mc: ModelConfig, device: torch.device, dtype: torch.dtype) -> HandlerModel:
    module, cls_name, package = BUILTIN_HANDLERS[mc.source]
    try:
        cls = getattr(importlib.import_module(f"{__name__}.{module}"), cls_name)
    except ImportError as e:
        raise ConfigError(f"model {mc.name!r} ({mc.source}) needs the {package} package: "
                          f"pip install 'tensord[handlers]' ({e})") from None
    handler = cls(mc, device, dtype)
    sig = Signature(handler.inputs, handler.outputs, max_batch=handler.limits.max_batch)
    model = HandlerModel(mc.name, handler, sig, str(device))
    model.kind = mc.source
    model.limits = handler.limits
    model.idempotent = True  # decode, run, rank: a pure function of the inputs
    return model
