"""Daemon configuration: defaults, the TOML file (`--config`), and the socket path rule."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .contract.descriptors import MAX_TENSORS

MiB = 1 << 20
GiB = 1 << 30
MAX_RING = 1 << 31


def default_socket_path() -> str:
    """SPEC §2.1: TENSORD_SOCKET, else /run/tensord/tensord.sock when /run/tensord exists,
    else /tmp/tensord.sock. Clients compute the same path."""
    env = os.environ.get("TENSORD_SOCKET")
    if env:
        return env
    if os.path.isdir("/run/tensord"):
        return "/run/tensord/tensord.sock"
    return "/tmp/tensord.sock"


SOURCES = ("torchscript", "export", "handler")
PRECISION_NAMES = ("auto", "fp32", "fp16", "bf16")


@dataclass
class ModelConfig:
    name: str
    source: str  # one of SOURCES
    path: str = ""  # torchscript / export file
    handler: str = ""  # "package.module:Class" for source = "handler"
    device: str = "auto"  # cpu | cuda:N | auto (the GPU when there is one)
    precision: str = "auto"  # auto = fp16 on CUDA, fp32 on CPU (CPU half kernels are slow)
    warmup: bool = True
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DaemonConfig:
    socket: str = ""
    socket_mode: int = 0o660
    default_ring: int = 16 * MiB
    max_ring: int = 1 * GiB
    max_sessions: int = 64
    spin_us: int = 0
    admin_uids: list[int] = field(default_factory=lambda: [os.getuid()])
    builtin_models: bool = True
    models: list[ModelConfig] = field(default_factory=list)
    # Where relative model paths resolve: the config file's directory (admin `load` too).
    base_dir: str = field(default_factory=os.getcwd)

    def socket_path(self) -> str:
        return self.socket or default_socket_path()


class ConfigError(ValueError):
    pass


_DAEMON_KEYS = {"socket", "socket_mode", "default_ring", "max_ring", "max_sessions", "spin_us",
                "admin_uids", "builtin_models"}
_MODEL_TYPES = {"name": str, "source": str, "path": str, "handler": str, "device": str,
                "precision": str, "warmup": bool, "inputs": list, "outputs": list,
                "options": dict}


def model_config(table: dict[str, Any], base_dir: str, what: str) -> ModelConfig:
    """One model's table (from the TOML file or an admin `load` message) -> ModelConfig."""
    unknown = set(table) - set(_MODEL_TYPES)
    if unknown:
        raise ConfigError(f"{what} has unknown keys {sorted(unknown)}; known: "
                          f"{sorted(_MODEL_TYPES)}")
    for k, t in _MODEL_TYPES.items():
        if k in table and not isinstance(table[k], t):
            raise ConfigError(f"{what}.{k} must be a {t.__name__}")
    for k in ("name", "source"):
        if k not in table:
            raise ConfigError(f"{what} needs a {k!r}")
    mc = ModelConfig(**table)
    if mc.source not in SOURCES:
        raise ConfigError(f"{what}: unknown source {mc.source!r}; known: {', '.join(SOURCES)}")
    if mc.precision not in PRECISION_NAMES:
        raise ConfigError(f"{what}: precision must be one of {', '.join(PRECISION_NAMES)}")
    for key in ("inputs", "outputs"):
        if len(getattr(mc, key)) > MAX_TENSORS:
            raise ConfigError(f"{what} declares {len(getattr(mc, key))} {key}; the protocol "
                              f"carries at most {MAX_TENSORS} per request (SPEC §7)")
    if mc.source in ("torchscript", "export") and not mc.path:
        raise ConfigError(f"{what}: source {mc.source!r} needs a path")
    if mc.source == "handler" and ":" not in mc.handler:
        raise ConfigError(f"{what}: source 'handler' needs handler = \"package.module:Class\"")
    if mc.path and not os.path.isabs(mc.path):
        mc.path = os.path.join(base_dir, mc.path)
    return mc


def load_config(path: str) -> DaemonConfig:
    """Read a TOML config; every unknown key or wrong type is an error naming the key."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    cfg = DaemonConfig(base_dir=base)
    daemon = raw.pop("daemon", {})
    for k, v in daemon.items():
        if k not in _DAEMON_KEYS:
            raise ConfigError(f"{path}: unknown key [daemon].{k}; known: {sorted(_DAEMON_KEYS)}")
        want = type(getattr(cfg, k))
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ConfigError(f"{path}: [daemon].{k} must be a {want.__name__}")
        setattr(cfg, k, v)
    for i, m in enumerate(raw.pop("models", [])):
        cfg.models.append(model_config(m, base, f"{path}: models[{i}]"))
    if raw:
        raise ConfigError(f"{path}: unknown tables {sorted(raw)}; known: daemon, models")
    if cfg.default_ring > cfg.max_ring:
        raise ConfigError(f"{path}: default_ring is larger than max_ring")
    if not 65536 <= cfg.max_ring <= MAX_RING:
        # record_len is a u32 on the wire (SPEC §4.3): a ring cannot hold a larger record
        raise ConfigError(f"{path}: max_ring must be between 65536 and {MAX_RING} bytes")
    return cfg
