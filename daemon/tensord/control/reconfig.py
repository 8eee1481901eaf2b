"""SIGHUP: serve the models the config file names now. Added models are loaded, removed ones
unloaded, changed ones reloaded with the atomic rules of admin reload (the new version is
loaded and warmed up before it replaces the old; a failure keeps the old one serving).
Models loaded at run time by admins and not named in the file are left alone."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..config import ConfigError, ModelConfig, load_config
from ..contract.errors import TensordError
from .admin import ModelControl

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [f"{k}: {', '.join(v)}" for k, v in
                 (("added", self.added), ("removed", self.removed), ("changed", self.changed))
                 if v]
        parts += [f"{name} failed ({why})" for name, why in self.failed.items()]
        return "; ".join(parts) or "no model changed"


class Reconfigurer:
    def __init__(self, control: ModelControl, path: str | None,
                 initial: list[ModelConfig]):
        self.control = control
        self.path = path
        self.from_file = {mc.name: mc for mc in initial}

    def apply(self) -> Outcome:
        """Re-read the file and converge on it (runs on a thread of its own: loads are slow)."""
        out = Outcome()
        if self.path is None:
            log.info("SIGHUP: the daemon runs without a config file; nothing to reload")
            return out
        try:
            wanted = {mc.name: mc for mc in load_config(self.path).models}
        except ConfigError as e:
            log.error("SIGHUP: %s; every model keeps serving as it was", e)
            out.failed["config"] = str(e)
            return out
        registry = self.control.registry
        for name in sorted(set(self.from_file) - set(wanted)):
            self._step(out, name, "removed", lambda n=name: self.control.unload(n))
        for name, mc in sorted(wanted.items()):
            old = self.from_file.get(name)
            if name not in registry:
                self._step(out, name, "added", lambda mc=mc: self._swap(mc))
            elif old != mc:
                self._step(out, name, "changed", lambda mc=mc: self._swap(mc))
        log.info("SIGHUP: reloaded %s: %s", self.path, out)
        return out

    def _swap(self, mc: ModelConfig) -> None:
        control = self.control
        with control._lock:  # one load at a time, as for admin messages
            model = control._load(mc, "; the previous version keeps serving")
            control.registry.add(model, mc)

    def _step(self, out: Outcome, name: str, what: str, fn) -> None:
        try:
            fn()
        except TensordError as e:
            out.failed[name] = e.message
            return
        getattr(out, what).append(name)
        if what == "removed":
            self.from_file.pop(name, None)
        else:
            self.from_file[name] = self.control.registry.config(name)
