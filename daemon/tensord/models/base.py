"""What every served model is: a name, a signature, a device and a forward function."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from ..contract.messages import ModelInfo, ModelLimits
from .signature import Signature, Value


@dataclass(frozen=True)
class BatchPolicy:
    """How a model's requests are queued and joined (its TOML keys; the serving core's queues)."""

    max_batch_size: int = 1  # <= 1: no batching
    max_queue_delay_us: int = 0  # how long a batch waits for more requests
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue: int = 1024  # queued requests; beyond: OVERLOADED
    instances: int = 1  # worker threads (GPU: one CUDA stream each)
    max_input_bytes: int = 0  # one request's input bytes; 0: only the ring bounds it
    max_batch_bytes: int = 0  # input bytes joined in one forward pass; 0: no limit


class Model(ABC):
    name: str
    signature: Signature
    device: str = "cpu"
    version: int = 1
    # True for models that do no tensor math: the dispatcher runs them itself.
    inline: bool = False
    # What serves it and what it refuses (SPEC §2.4 model info `kind`, `limits`).
    kind: str = "builtin"
    limits: ModelLimits = ModelLimits()
    batching: BatchPolicy = BatchPolicy()
    # SPEC §2.4 `idempotent`: running a request twice has the effect of running it once. Off
    # unless the model says so (built-ins) or its config does (`idempotent = true`).
    idempotent: bool = False
    # Bytes of daemon memory per input byte while it runs (models/memory.py); 0: not measured
    # (serving assumes memory.FALLBACK_FACTOR, or none for handlers with per-item limits).
    memory_factor: float = 0.0

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
            kind=self.kind,
            limits=self.limits,
            idempotent=self.idempotent,
        )
