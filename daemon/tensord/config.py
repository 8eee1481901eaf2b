"""Daemon configuration: defaults, the TOML file (`--config`), and the socket path rule."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
MAX_RING = 1 << 31
# A per-uid bound left unset: control/limits.py derives it (a quarter of the whole).
DEFAULT_SHARE = -1
UID_SHARE = 4


def default_socket_path() -> str:
    """SPEC §2.1: TENSORD_SOCKET, else /run/tensord/tensord.sock when /run/tensord exists,
    else /tmp/tensord.sock. Clients compute the same path."""
    env = os.environ.get("TENSORD_SOCKET")
    if env:
        return env
    if os.path.isdir("/run/tensord"):
        return "/run/tensord/tensord.sock"
    return "/tmp/tensord.sock"


# The built-in handlers (models/builtin_handlers/) serve a network from configuration alone.
BUILTIN_HANDLERS = ("vision.classify", "text.classify", "text.embed")
SOURCES = ("torchscript", "export", "handler", "builtin", *BUILTIN_HANDLERS)
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
    # Built-in handlers: the network as a Python factory instead of a `path`, and their files
    # (a path, or "package:NAME/file" inside an installed package).
    module: str = ""  # "package.module:factory" returning a torch.nn.Module
    labels: str = ""  # one class name per line
    tokenizer: str = ""  # a Hugging Face tokenizer.json
    # Scheduling (the serving core's queues, daemon/native/src/engine): batching is off
    # while max_batch_size <= 1.
    max_batch_size: int = 0  # 0: the model's own default (1, or the built-in's)
    max_queue_delay_us: int = 0
    preferred_batch_sizes: list[int] = field(default_factory=list)
    max_queue: int = 1024
    instances: int = 1
    max_input_bytes: int = 0  # a request whose inputs are larger is TOO_LARGE; 0: no limit
    max_batch_bytes: int = 0  # input bytes one forward pass may join; 0: no limit
    # Running a request twice has the effect of running it once (a pure function of its
    # inputs): clients may then make again a request that may have run (SPEC §6). None: the
    # model's own default (true for the built-in models and handlers, false otherwise).
    idempotent: bool | None = None
    # Bytes of daemon memory one byte of a request's inputs takes while the model runs (its
    # gathered copy, activations, outputs; models/memory.py). 0: measured at warm-up.
    memory_factor: float = 0.0


@dataclass
class DaemonConfig:
    socket: str = ""
    socket_mode: int = 0o660
    default_ring: int = 16 * MiB
    max_ring: int = 1 * GiB
    max_sessions: int = 64
    spin_us: int = 0
    admin_uids: list[int] = field(default_factory=lambda: [os.getuid()])
    # Whose requests may ask for high priority (SPEC §4.4); others' are served at normal
    # priority. High priority never starves normal (the core's HIGH_RUN).
    priority_uids: list[int] = field(default_factory=list)
    builtin_models: bool = True
    threads: int = 0  # PyTorch intra-op threads on the CPU; 0: half the cores this process may use
    # health: a model whose forward pass has run longer than this is reported not ready
    stuck_after_s: float = 60.0
    # SIGTERM: how long queued and running requests may take to finish before the daemon exits
    drain_grace_s: float = 10.0
    # Bounds no client gets past (control/limits.py); 0: no such bound.
    max_pending: int = 64  # connections that have not sent hello; past it the oldest is refused
    # Per uid, so one misbehaving service cannot lock the others out (issue 19.7). Unset
    # (DEFAULT_SHARE): a quarter of max_sessions, and a quarter of max_memory or, when that
    # is 0, of the memory the daemon has at start (the host's or its cgroup's).
    max_sessions_per_uid: int = DEFAULT_SHARE
    max_memory: int = 0  # bytes of session segments, all sessions together
    max_memory_per_uid: int = DEFAULT_SHARE
    # Responses the daemon holds for a session whose client does not read them (parked until
    # it frees response-ring space); they count against max_memory and max_memory_per_uid too.
    max_parked_per_session: int = 64 * MiB
    # Memory forward passes may take (models/memory.py): a request whose inputs times its
    # model's memory_factor exceed it is TOO_LARGE, and batches are never joined past it;
    # each large pass is also checked against the memory the daemon has when it starts.
    # 0: half the memory the daemon has at start (the host's, or its cgroup's when less).
    max_compute_memory: int = 0
    # Admin loads are code execution (SPEC §2.6). For admins other than root and the daemon's
    # own user: the handlers/modules they may name (None: those named in [[models]] at start;
    # "pkg.mod:Class", "pkg.mod:*", "*") and the directories their model files must be in.
    allow_handlers: list[str] | None = None
    model_dirs: list[str] = field(default_factory=list)
    metrics: str = ""  # Prometheus listener: "" (off), "127.0.0.1:9464", "unix:/path"
    models: list[ModelConfig] = field(default_factory=list)
    # Where relative model paths resolve: the config file's directory (admin `load` too).
    base_dir: str = field(default_factory=os.getcwd)
    path: str = ""  # the config file (SIGHUP re-reads it); "" when there is none

    def socket_path(self) -> str:
        return self.socket or default_socket_path()


class ConfigError(ValueError):
    pass


_DAEMON_KEYS = {"socket", "socket_mode", "default_ring", "max_ring", "max_sessions", "spin_us",
                "admin_uids", "priority_uids", "builtin_models", "threads", "stuck_after_s",
                "drain_grace_s", "max_pending",
                "max_sessions_per_uid", "max_memory", "max_memory_per_uid", "allow_handlers",
                "max_parked_per_session", "max_compute_memory",
                "model_dirs", "metrics"}
_STR_LISTS = {"allow_handlers", "model_dirs"}
_MODEL_TYPES = {"name": str, "source": str, "path": str, "handler": str, "device": str,
                "precision": str, "warmup": bool, "inputs": list, "outputs": list,
                "options": dict, "max_batch_size": int, "max_queue_delay_us": int,
                "preferred_batch_sizes": list, "max_queue": int, "instances": int,
                "max_input_bytes": int, "max_batch_bytes": int, "idempotent": bool,
                "memory_factor": float,
                "module": str, "labels": str, "tokenizer": str}


def model_config(table: dict[str, Any], base_dir: str, what: str) -> ModelConfig:
    """One model's table (from the TOML file or an admin `load` message) -> ModelConfig."""
    unknown = set(table) - set(_MODEL_TYPES)
    if unknown:
        raise ConfigError(f"{what} has unknown keys {sorted(unknown)}; known: "
                          f"{sorted(_MODEL_TYPES)}")
    if type(table.get("memory_factor")) is int:
        table = {**table, "memory_factor": float(table["memory_factor"])}  # TOML writes 8 for 8.0
    for k, t in _MODEL_TYPES.items():
        if k in table and not isinstance(table[k], t):
            raise ConfigError(f"{what}.{k} must be a {t.__name__}")
    for k in ("name", "source"):
        if k not in table:
            raise ConfigError(f"{what} needs a {k!r}")
    mc = ModelConfig(**table)
    if mc.memory_factor != 0 and not 1 <= mc.memory_factor <= 1e6:
        raise ConfigError(f"{what}.memory_factor must be 0 (measured at warm-up) or between 1 "
                          "and 1e6 (bytes of daemon memory per input byte)")
    if mc.source not in SOURCES:
        raise ConfigError(f"{what}: unknown source {mc.source!r}; known: {', '.join(SOURCES)}")
    if mc.precision not in PRECISION_NAMES:
        raise ConfigError(f"{what}: precision must be one of {', '.join(PRECISION_NAMES)}")
    for key in ("max_batch_size", "max_queue_delay_us", "max_queue", "instances",
                "max_input_bytes", "max_batch_bytes"):
        if getattr(mc, key) < 0 or isinstance(getattr(mc, key), bool):
            raise ConfigError(f"{what}.{key} must be a non-negative integer")
    if mc.max_queue < 1 or mc.instances < 1:
        raise ConfigError(f"{what}: max_queue and instances must be at least 1")
    if not all(type(n) is int and n >= 1 for n in mc.preferred_batch_sizes):
        raise ConfigError(f"{what}.preferred_batch_sizes must hold positive integers")
    from .contract.descriptors import MAX_TENSORS  # here: the operator commands stay torch-free

    for key in ("inputs", "outputs"):
        if len(getattr(mc, key)) > MAX_TENSORS:
            raise ConfigError(f"{what} declares {len(getattr(mc, key))} {key}; the protocol "
                              f"carries at most {MAX_TENSORS} per request (SPEC §7)")
    if mc.source in ("torchscript", "export") and not mc.path:
        raise ConfigError(f"{what}: source {mc.source!r} needs a path")
    if mc.source == "handler" and ":" not in mc.handler:
        raise ConfigError(f"{what}: source 'handler' needs handler = \"package.module:Class\"")
    if mc.source in BUILTIN_HANDLERS and bool(mc.path) == bool(mc.module):
        raise ConfigError(f"{what}: source {mc.source!r} needs a path (TorchScript or "
                          "torch.export file) or a module (\"package.module:factory\"), not both")
    for key in ("path", "labels", "tokenizer"):
        v = getattr(mc, key)
        if v and not v.startswith("package:") and not os.path.isabs(v):
            setattr(mc, key, os.path.join(base_dir, v))
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
    cfg = DaemonConfig(base_dir=base, path=os.path.abspath(path))
    daemon = raw.pop("daemon", {})
    for k, v in daemon.items():
        if k not in _DAEMON_KEYS:
            raise ConfigError(f"{path}: unknown key [daemon].{k}; known: {sorted(_DAEMON_KEYS)}")
        if k in _STR_LISTS:
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{path}: [daemon].{k} must be a list of strings")
            setattr(cfg, k, v)
            continue
        want = type(getattr(cfg, k))
        if want is float and type(v) is int:
            v = float(v)  # TOML writes 60 for 60.0
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ConfigError(f"{path}: [daemon].{k} must be a {want.__name__}")
        setattr(cfg, k, v)
    for k in ("admin_uids", "priority_uids"):
        if not all(type(u) is int and u >= 0 for u in getattr(cfg, k)):
            raise ConfigError(f"{path}: [daemon].{k} must be a list of uids (integers)")
    cfg.model_dirs = [os.path.join(base, p) for p in cfg.model_dirs]
    for k in ("max_sessions_per_uid", "max_memory", "max_memory_per_uid"):
        if k in daemon and daemon[k] < 0:
            raise ConfigError(f"{path}: [daemon].{k} must be 0 (no bound) or positive")
    if cfg.max_compute_memory < 0:
        raise ConfigError(f"{path}: [daemon].max_compute_memory must be 0 (half the memory the "
                          "daemon has at start) or positive")
    if cfg.max_parked_per_session < 0:
        raise ConfigError(f"{path}: [daemon].max_parked_per_session must be 0 or positive")
    if cfg.max_pending < 1:
        raise ConfigError(f"{path}: [daemon].max_pending must be at least 1")
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
