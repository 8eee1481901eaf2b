"""The set of models the daemon serves, looked up by name from any session thread."""

from __future__ import annotations

import threading

from ..config import ModelConfig
from ..contract.errors import UnknownModelError
from ..contract.messages import ModelInfo
from .base import Model


class Registry:
    def __init__(self, models: list[Model] | None = None):
        self._lock = threading.Lock()
        self._models: dict[str, Model] = {}
        self._configs: dict[str, ModelConfig] = {}
        # Versions of unloaded models, so a later load continues the count (SPEC: version
        # increases by one on each (re)load) and a client never sees a version come back.
        self._last_version: dict[str, int] = {}
        self._watchers: list = []
        for m in models or []:
            self.add(m)

    def watch(self, fn) -> None:
        """Call fn(name) after a model of that name was added, replaced or removed (the serving
        core serves the new version; the old one drains)."""
        self._watchers.append(fn)

    def peek(self, name: str) -> Model | None:
        return self._models.get(name)

    def _changed(self, name: str) -> None:
        for fn in self._watchers:
            fn(name)

    def add(self, model: Model, config: ModelConfig | None = None) -> None:
        """Serve `model`, replacing one of the same name in a single step: requests that already
        hold the old object finish on it, new ones get the new one."""
        with self._lock:
            old = self._models.get(model.name)
            if old is not None:
                model.version = old.version + 1
            elif model.name in self._last_version:
                model.version = self._last_version[model.name] + 1
            self._models[model.name] = model
            if config is not None:
                self._configs[model.name] = config
            else:
                self._configs.pop(model.name, None)
        self._changed(model.name)

    def config(self, name: str) -> ModelConfig | None:
        """The config a model was loaded from (None for built-in models)."""
        self.get(name)
        return self._configs.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def remove(self, name: str) -> Model:
        with self._lock:
            try:
                model = self._models.pop(name)
            except KeyError:
                raise self._unknown(name) from None
            self._configs.pop(name, None)
            self._last_version[name] = model.version
        self._changed(name)
        return model

    def get(self, name: str) -> Model:
        # A plain dict read is atomic under the GIL; the lock only orders writers.
        m = self._models.get(name)
        if m is None:
            raise self._unknown(name)
        return m

    def infos(self) -> list[ModelInfo]:
        with self._lock:
            return [self._models[n].info() for n in sorted(self._models)]

    def _unknown(self, name: str) -> UnknownModelError:
        return UnknownModelError(
            f"no model named {name!r}; this daemon serves {sorted(self._models)} "
            "(list them with Models())"
        )
