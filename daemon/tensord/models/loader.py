"""Build served models from config entries."""

from __future__ import annotations

from ..config import ConfigError, ModelConfig
from .base import Model
from .signature import Signature, Spec
from .torchscript import TorchScriptModel


def signature_from_config(mc: ModelConfig) -> Signature:
    try:
        return Signature(
            inputs=tuple(Spec.parse(d, f"model {mc.name!r} input") for d in mc.inputs),
            outputs=tuple(Spec.parse(d, f"model {mc.name!r} output") for d in mc.outputs),
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load_model(mc: ModelConfig) -> Model:
    sig = signature_from_config(mc)
    if not sig.inputs or not sig.outputs:
        raise ConfigError(f"model {mc.name!r}: declare its inputs and outputs")
    if mc.source == "torchscript":
        try:
            return TorchScriptModel.load(mc.name, mc.path, sig, mc.device)
        except Exception as e:  # torch.jit.load raises RuntimeError, ValueError, OSError...
            raise ConfigError(f"model {mc.name!r}: cannot load TorchScript file {mc.path}: "
                              f"{type(e).__name__}: {e}") from None
    raise ConfigError(f"model {mc.name!r}: unknown source {mc.source!r} (known: torchscript)")
