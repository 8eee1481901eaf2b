"""What every served model is: a name, a signature, a device and a forward function."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from ..contract.messages import ModelInfo
from .signature import Signature, Value


class Model(ABC):
    name: str
    signature: Signature
    device: str = "cpu"
    version: int = 1
    # True for models that do no tensor math: the executor runs them in the caller's thread.
    inline: bool = False

    @abstractmethod
    def forward(self, inputs: Sequence[Value]) -> Sequence[Value]:
        """Inputs in signature order; returns outputs in signature order. Input tensors may be
        views of shared memory that stop being valid when this returns: a model that keeps data
        must copy it."""

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            version=self.version,
            device=self.device,
            inputs=[s.wire() for s in self.signature.inputs],
            outputs=[s.wire() for s in self.signature.outputs],
        )
