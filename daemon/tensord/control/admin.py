"""Runtime model control (admin messages load / unload / reload).

Loads run in the calling connection's thread: they may take seconds, and only that admin
client waits. The new model is loaded and warmed up before it replaces the old one, so a failed
load changes nothing and a reload never leaves a gap."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ..config import ConfigError, model_config
from ..contract.errors import BadRequestError, ModelFailedError, UnsupportedError
from ..models.loader import LoadError, load_model
from ..models.registry import Registry
from ..serving.executor import Executor

log = logging.getLogger(__name__)


class ModelControl:
    def __init__(self, registry: Registry, executor: Executor, base_dir: str | None = None):
        self.registry = registry
        self.executor = executor
        self.base_dir = base_dir or os.getcwd()
        self._lock = threading.Lock()  # one load at a time: two reloads must not interleave

    def load(self, name: str, table: dict[str, Any]) -> None:
        try:
            mc = model_config({**table, "name": name}, self.base_dir, f"model {name!r} config")
        except ConfigError as e:
            raise BadRequestError(str(e)) from None
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
