"""Runs a model's forward pass and turns what it returns into host tensors for the ring."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .contract.dtypes import ByteStrings
from .contract.errors import ModelFailedError, TensordError
from .models.base import Model
from .models.signature import Value

log = logging.getLogger(__name__)


class Executor:
    def run(self, model: Model, inputs: Sequence[Value]) -> tuple[list[Value], list[str]]:
        """Returns the outputs (contiguous, still on the model's device: the session copies them
        straight into its response ring) and their wire dtypes. Callers run it under
        torch.inference_mode() (session threads enter it once, not per request)."""
        try:
            outputs = model.forward(inputs)
        except TensordError:
            raise
        except Exception as e:  # a model may raise anything; the caller gets it as an error
            log.info("model %s raised %s: %s", model.name, type(e).__name__, e)
            raise ModelFailedError(
                f"model {model.name!r} raised {type(e).__name__}: {e}"
            ) from None
        if isinstance(outputs, (torch.Tensor, ByteStrings)):
            outputs = [outputs]
        outputs = list(outputs)
        dtypes = model.signature.check_outputs(model.name, outputs)
        return [_contiguous(o) for o in outputs], dtypes


def _contiguous(v: Value) -> Value:
    return v.detach().contiguous() if isinstance(v, torch.Tensor) else v
