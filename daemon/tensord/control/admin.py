"""Runtime model control (admin messages load / unload / reload).

Loads run on a thread of their own (control/server.py): they may take seconds, and only that
admin client waits. The new model is loaded and warmed up before it replaces the old one, so a
failed load changes nothing and a reload never leaves a gap.

A load is code execution in the daemon: a handler or module factory is imported and run, and a
model file is read and run by torch. Admins other than root and the daemon's own user (who
can already do anything a load does) may therefore only name handlers and modules in
`allow_handlers` (by default those the config file names at start) and files under
`model_dirs` (LoadPolicy below).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ..config import ConfigError, DaemonConfig, ModelConfig, model_config
from ..contract.errors import (
    BadRequestError,
    ModelFailedError,
    PermissionDeniedError,
    ResourceError,
    UnsupportedError,
)
from ..models.loader import LoadError, load_model
from ..models.registry import Registry
from ..serving.executor import Executor

log = logging.getLogger(__name__)


# Config keys naming code the daemon imports ("package.module:Name"), and files it reads.
CODE_KEYS = ("handler", "module")
FILE_KEYS = ("path", "labels", "tokenizer")
PACKAGE_PREFIX = "package:"  # a file inside an installed package: importing it runs its code


def handler_allowed(ref: str, allowed: list[str]) -> bool:
    """Whether `ref` matches an allow_handlers entry: the same string, or an entry ending in
    `*` that is a prefix of it ("pkg.mod:*": any name in pkg.mod; "*": anything)."""
    return any(ref == a or (a.endswith("*") and ref.startswith(a[:-1])) for a in allowed)


class LoadPolicy:
    """What admins other than root and the daemon's own user may load (see the module doc)."""

    def __init__(self, allow_handlers: list[str] | None, model_dirs: list[str],
                 config_models: list[ModelConfig] = ()):
        if allow_handlers is None:  # default: what the config file names at start
            allow_handlers = [getattr(mc, k, "") for mc in config_models
                              for k in (*CODE_KEYS, *FILE_KEYS)
                              if getattr(mc, k, "") and (k in CODE_KEYS or getattr(
                                  mc, k).startswith(PACKAGE_PREFIX))]
        self.allow_handlers = list(allow_handlers)
        self.model_dirs = [os.path.realpath(d) for d in model_dirs]
        self.trusted = {0, os.getuid()}

    @classmethod
    def from_config(cls, cfg: DaemonConfig) -> LoadPolicy:
        return cls(cfg.allow_handlers, cfg.model_dirs, cfg.models)

    def check(self, mc: ModelConfig, uid: int | None) -> None:
        if uid is None or uid in self.trusted:
            return
        for k in CODE_KEYS:
            ref = getattr(mc, k, "")
            if ref and not handler_allowed(ref, self.allow_handlers):
                raise PermissionDeniedError(
                    f"uid {uid} may not load {k} {ref!r}: loading runs its code inside the "
                    "daemon; list it in [daemon] allow_handlers (allowed now: "
                    f"{self.allow_handlers or 'none'})")
        for k in FILE_KEYS:
            ref = getattr(mc, k, "")
            if not ref:
                continue
            if ref.startswith(PACKAGE_PREFIX):
                if not handler_allowed(ref, self.allow_handlers):
                    raise PermissionDeniedError(
                        f"uid {uid} may not load {k} {ref!r} (importing the package runs its "
                        "code); list it in [daemon] allow_handlers")
                continue
            real = os.path.realpath(ref)  # symlinks and .. resolved: where it really is
            if not any(real == d or real.startswith(d.rstrip("/") + "/")
                       for d in self.model_dirs):
                raise PermissionDeniedError(
                    f"uid {uid} may not load {k} {ref!r}: it is not under a directory of "
                    f"[daemon] model_dirs ({self.model_dirs or 'none configured'}); model "
                    "files run code inside the daemon")


class ModelControl:
    def __init__(self, registry: Registry, executor: Executor, base_dir: str | None = None,
                 policy: LoadPolicy | None = None):
        self.registry = registry
        self.executor = executor
        self.base_dir = base_dir or os.getcwd()
        self.policy = policy or LoadPolicy(None, [])
        self._lock = threading.Lock()  # one load at a time: two reloads must not interleave

    def load(self, name: str, table: dict[str, Any], uid: int | None = None) -> None:
        """Load a model from a config table; `uid` (the admin's) is checked against the
        policy, None: the caller is trusted."""
        try:
            mc = model_config({**table, "name": name}, self.base_dir, f"model {name!r} config")
        except ConfigError as e:
            raise BadRequestError(str(e)) from None
        self.policy.check(mc, uid)
        with self._lock:
            if name in self.registry:
                raise BadRequestError(f"model {name!r} is already loaded: send reload, or "
                                      "unload it first")
            self.registry.add(self._load(mc, ""), mc)
        log.info("loaded model %s", name)

    def reload(self, name: str) -> None:
        with self._lock:
            mc = self.registry.config(name)
            if mc is None:
                raise UnsupportedError(f"model {name!r} is built in; there is nothing to reload")
            self.registry.add(self._load(mc, "; the previous version keeps serving"), mc)
        log.info("reloaded model %s (version %d)", name, self.registry.get(name).version)

    def unload(self, name: str) -> None:
        with self._lock:
            self.registry.remove(name)
        log.info("unloaded model %s", name)

    def _load(self, mc, note: str):
        try:
            # Loading and warming up run torch ops: on a thread of their own (see executor.py).
            return self.executor.aside(load_model, mc)
        except LoadError as e:
            raise ModelFailedError(f"{e}{note}") from None
        except RuntimeError as e:
            if "thread" not in str(e):
                raise
            raise ResourceError(f"the daemon cannot start a thread to load the model ({e}): "
                                "it is at its task limit (systemd TasksMax=, RLIMIT_NPROC)"
                                f"{note}") from None
