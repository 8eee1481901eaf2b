"""Build served models from config entries: load, place on the device, warm up."""

from __future__ import annotations

import importlib
import logging

import torch

from ..config import BUILTIN_HANDLERS, ConfigError, ModelConfig
from ..contract.dtypes import DTYPES
from . import builtin_handlers
from .base import BatchPolicy, Model
from .handler import Handler, HandlerModel, LoadContext
from .memory import measure_factor
from .modules import PRECISIONS, ModuleModel, load_exported, load_torchscript
from .signature import Signature, Spec

log = logging.getLogger(__name__)


class LoadError(Exception):
    """A model could not be loaded; the message says which and why."""


def resolve_device(spec: str, model: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"model {model!r}: device {spec!r} is not cpu, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"model {model!r} asks for {spec}, but CUDA is not available on "
                              "this host: use device = \"auto\" (GPU when present) or \"cpu\"")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"model {model!r} asks for {spec}; this host has "
                              f"{torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise ConfigError(f"model {model!r}: device type {dev.type!r} is not supported")
    return dev


def resolve_precision(name: str, device: torch.device, model: str) -> torch.dtype:
    """`auto` is fp16 on a GPU and fp32 on the CPU, where PyTorch's half kernels are far
    slower than fp32 (ResNet-18 measured about 80x slower on a 2-core VM)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and name == "fp16":
        log.warning("model %s: precision fp16 on the CPU runs PyTorch's CPU half kernels, "
                    "often tens of times slower than fp32; use precision = \"auto\" or "
                    "\"fp32\" unless memory is what matters", model)
    return PRECISIONS[name]


def _specs(items, what: str) -> tuple[Spec, ...]:
    try:
        return tuple(Spec.parse(d, what) for d in items)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load_model(mc: ModelConfig) -> Model:
    """Load, place and warm up one model. Raises LoadError with the reason."""
    try:
        model = _build(mc)
        model.batching = _batch_policy(mc, model)
        if mc.idempotent is not None:
            model.idempotent = mc.idempotent
        model.memory_factor = mc.memory_factor  # 0: warm-up measures it
        if mc.warmup:
            warm_up(model)
        return model
    except (ConfigError, LoadError) as e:
        raise LoadError(str(e)) from None
    except Exception as e:  # torch loaders and user handlers raise anything
        raise LoadError(f"model {mc.name!r} ({mc.source}) failed to load: "
                        f"{type(e).__name__}: {e}") from None


def _batch_policy(mc: ModelConfig, model: Model) -> BatchPolicy:
    """The config's scheduling keys; max_batch_size 0 keeps the model's own default."""
    return BatchPolicy(
        max_batch_size=mc.max_batch_size or model.batching.max_batch_size,
        max_queue_delay_us=mc.max_queue_delay_us,
        preferred_batch_sizes=tuple(sorted(mc.preferred_batch_sizes)),
        max_queue=mc.max_queue, instances=mc.instances, max_input_bytes=mc.max_input_bytes,
        max_batch_bytes=mc.max_batch_bytes)


def _build(mc: ModelConfig) -> Model:
    if mc.source == "builtin":
        # A built-in model under its own name, with the config's scheduling keys.
        from .builtin import builtin_models

        for m in builtin_models():
            if m.name == mc.name:
                return m
        raise ConfigError(f"model {mc.name!r}: there is no built-in model of that name "
                          "(built-in: identity, mlp)")
    device = resolve_device(mc.device, mc.name)
    precision = resolve_precision(mc.precision, device, mc.name)
    if mc.source in BUILTIN_HANDLERS:
        if mc.inputs or mc.outputs:
            raise ConfigError(f"model {mc.name!r}: {mc.source} declares its own inputs and "
                              "outputs (from its options); remove inputs/outputs")
        return builtin_handlers.build(mc, device, precision)
    inputs = _specs(mc.inputs, f"model {mc.name!r} input")
    outputs = _specs(mc.outputs, f"model {mc.name!r} output")
    if mc.source == "handler":
        handler = _import_handler(mc)
        sig = Signature(inputs or tuple(handler.inputs), outputs or tuple(handler.outputs))
        if not sig.inputs or not sig.outputs:
            raise ConfigError(f"model {mc.name!r}: handler {mc.handler} declares no signature; "
                              "give inputs and outputs in the config")
        handler.load(LoadContext(device, precision, dict(mc.options)))
        return HandlerModel(mc.name, handler, sig, str(device))
    if not inputs or not outputs:
        raise ConfigError(f"model {mc.name!r}: declare its inputs and outputs in the config")
    sig = Signature(inputs, outputs)
    if mc.source == "torchscript":
        module = load_torchscript(mc.path, device)
    else:
        module = load_exported(mc.path)
    return ModuleModel(mc.name, module, sig, device, precision, kind=mc.source)


def _import_handler(mc: ModelConfig) -> Handler:
    mod_name, _, cls_name = mc.handler.partition(":")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model {mc.name!r}: cannot import handler {mc.handler}: {e}") from None
    handler = cls()
    if not isinstance(handler, Handler):
        raise ConfigError(f"model {mc.name!r}: {mc.handler} is not a tensord Handler subclass")
    return handler


def warm_up(model: Model) -> None:
    """Run the model once before it serves: first-call costs (lazy init, kernel selection)
    are paid here, and a model whose outputs break its declared signature fails its load
    instead of its first caller."""
    example = getattr(getattr(model, "handler", None), "example_inputs", None)
    if example is not None:
        inputs = example()
    else:
        inputs = []
        for s in model.signature.inputs:
            if s.shape is None or s.dtype in ("any", "bytes"):
                log.info("model %s: no warm-up (input %s has no fixed form)", model.name, s.name)
                return
            shape = tuple(1 if d < 0 else d for d in s.shape)
            inputs.append(torch.zeros(shape, dtype=DTYPES[s.dtype].torch_dtype))
    with torch.inference_mode():
        outputs = model.forward(inputs)
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        model.signature.check_outputs(model.name, list(outputs))
    if model.device.startswith("cuda"):
        torch.cuda.synchronize()
    if not model.memory_factor and example is None:
        factor = measure_factor(model)
        if factor is not None:
            model.memory_factor = factor
            log.info("model %s: a forward pass takes %.1f bytes of daemon memory per input "
                     "byte (measured; memory_factor in its config replaces it)", model.name,
                     factor)
