"""The daemon's serving side over its native core (tensord._core.Engine): sessions handed to
the core, the registry's models compiled into it, one Python worker thread per model instance,
and the counters the control plane reads. Per request nothing here runs: the core's dispatcher
reads every ring, checks and queues requests, answers errors and the built-in `identity`, and
workers (worker.py) enter Python once per batch.

```
 control plane ──add_session/end_session──▶ Engine (native: dispatcher, queues, batches)
 registry ──set_model/remove_model────────▶   │ next_batch (GIL released)
                                              ▼
                                  worker.py: one forward pass per batch ──complete/fail──▶
```
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import _core, metrics
from ..contract.errors import ErrorCode, ProtocolError, ResourceError, TensordError
from ..contract.messages import ModelHealth, ModelLimits, ModelStat
from ..models.base import Model
from ..models.memory import FALLBACK_FACTOR, ComputeBudget, smallest_request
from ..models.registry import Registry
from ..transport.segment import Segment
from . import cuda
from .executor import Executor
from .worker import per_request, work

log = logging.getLogger(__name__)


def batchable(model: Model) -> bool:
    """Only models whose every input and output has a batch dimension (-1 first) batch."""
    specs = model.signature.inputs + model.signature.outputs
    return all(s.shape is not None and len(s.shape) >= 1 and s.shape[0] == -1 for s in specs)


@dataclass
class _Served:
    model: Model
    queue: object  # _core.ModelQueue
    workers: list[threading.Thread]


def _least(*bounds: int) -> int:
    """The tightest of some bounds where 0 means none."""
    return min((b for b in bounds if b), default=0)


class SessionHandle:
    """A session as the control plane holds it: its id in the core and its callbacks."""

    def __init__(self, serving: Serving, sid: int, name: str, seg: Segment,
                 on_fatal: Callable[[TensordError], None], on_freed: Callable[[], None]):
        self.serving = serving
        self.sid = sid
        self.id = name
        self.seg = seg
        self.on_fatal = on_fatal
        self.on_freed = on_freed
        self.stopped = False

    @property
    def served(self) -> int:
        return self.serving.engine.session_served(self.sid)

    def idle(self) -> bool:
        return self.stopped or self.serving.engine.session_idle(self.sid)

    def end(self) -> None:
        """Stop serving; the segment is freed (and on_freed called) once no batch holds it."""
        if not self.stopped:
            self.stopped = True
            self.serving.engine.end_session(self.sid)


class Serving:
    def __init__(self, registry: Registry, executor: Executor, spin_us: int = 0,
                 max_memory: int = 0, max_memory_per_uid: int = 0,
                 compute: ComputeBudget | None = None):
        self.registry = registry
        self.executor = executor
        self.compute = compute or ComputeBudget(0)
        self.engine = _core.Engine(spin_us, max_memory, max_memory_per_uid)
        metrics.use_core(self.engine.metrics)
        metrics.DISPATCH_PASS.set_function(self.engine.longest_pass)
        self._lock = threading.Lock()
        self._served: dict[str, _Served] = {}
        self._sessions: dict[int, SessionHandle] = {}
        self._stopping = False
        self._events = threading.Thread(target=self._relay, name="core-events", daemon=True)
        registry.watch(self._sync)
        for info in registry.infos():
            self._sync(info.name)

    def start(self) -> None:
        self.engine.start()
        self._events.start()

    def alive(self) -> bool:
        return self.engine.alive()

    # -- models ----------------------------------------------------------------------------

    def _sync(self, name: str) -> None:
        """The registry changed `name`: serve its current version (the old one drains)."""
        model = self.registry.peek(name)
        with self._lock:
            cur = self._served.get(name)
            if cur is not None and cur.model is model:
                return
            if model is None:
                self.engine.remove_model(name)
                self._served.pop(name, None)
                return
            p = model.batching
            factor = self._factor(model)
            bound = self.compute.bound(factor)
            least = smallest_request(model)
            if bound and least > bound:
                log.warning("model %s: its smallest request (%d bytes of input) is past what one "
                            "forward pass may take (%d bytes: max_compute_memory / its "
                            "memory_factor %.1f), so every request will be refused TOO_LARGE: "
                            "raise max_compute_memory", name, least, bound, factor)
            how = "" if model.memory_factor else " (assumed: it could not be measured)"
            why = (f"running it takes about {factor:.1f} bytes of daemon memory per input "
                   f"byte{how}, and one forward pass may take {self.compute.limit >> 20} MiB "
                   "(max_compute_memory)")
            q = self.engine.set_model(
                model.name, model.version,
                [(s.name, s.dtype, None if s.shape is None else list(s.shape))
                 for s in model.signature.inputs],
                model.signature.max_batch, p.max_input_bytes,
                p.max_batch_size, p.max_queue_delay_us, list(p.preferred_batch_sizes),
                p.max_queue, _least(p.max_batch_bytes, bound),
                p.max_batch_size > 1 and batchable(model), model.inline, (bound, why))
            workers = []
            if not model.inline:
                for i in range(max(1, p.instances)):
                    t = threading.Thread(target=self._work, args=(q, model),
                                         name=f"model-{model.name}-{i}", daemon=True)
                    try:
                        t.start()
                    except RuntimeError as e:  # can't start new thread: at the task limit
                        q.retire()
                        raise ResourceError(
                            f"the daemon cannot start a worker thread for model {name!r} ({e}): "
                            "it is at its task limit (systemd TasksMax=, RLIMIT_NPROC)") from None
                    workers.append(t)
            self._served[name] = _Served(model, q, workers)

    @staticmethod
    def _factor(model: Model) -> float:
        """The model's memory per input byte for compute admission; 0: none (the built-in
        identity, and models whose limits bound each item: the built-in vision and text
        handlers, whose cost follows pixels and tokens, not input bytes)."""
        if model.inline or (per_request(model) and model.limits != ModelLimits()):
            return 0.0
        factor = model.memory_factor or FALLBACK_FACTOR
        if model.device.startswith("cuda"):
            factor += 1  # the page-locked staging copy (the measured factor is host memory)
        return factor

    def _work(self, q, model: Model) -> None:
        stream = None
        if model.device.startswith("cuda"):
            stream = cuda.SideStream(torch.device(model.device)).stream
        work(q, model, self.executor, stream, compute=self.compute, factor=self._factor(model))

    def stats(self) -> list[ModelStat]:
        """Every served model's counters, sorted by name (zeros before its first request)."""
        out = []
        with self._lock:
            served = dict(self._served)
        for info in self.registry.infos():
            s = served.get(info.name)
            if s is None or s.model.version != info.version:
                out.append(ModelStat(info.name, info.version, 0, 0, 0, 0, 0, 0, [], 0, 0, 0))
                continue
            (ok, failed, bad_input, rejected, expired, batches, sizes, queue_us, compute_us,
             max_queue_us, _retried) = s.queue.stats()
            out.append(ModelStat(
                name=info.name, version=info.version, queued=s.queue.length, served=ok,
                failed=failed, rejected=rejected, expired=expired, batches=batches,
                batch_sizes=[[k, v] for k, v in sizes], queue_us=queue_us,
                compute_us=compute_us, max_queue_us=max_queue_us,
                # the caller's error, never `failed` (model_stats.bad_input, issue 17.9)
                bad_input=bad_input or None))
        return out

    def health(self, stuck_after: float) -> list[ModelHealth]:
        """Per model: queue length and the age of its oldest running forward pass; a model
        whose pass has run longer than `stuck_after` seconds is not ready."""
        with self._lock:
            served = dict(self._served)
        out = []
        for info in self.registry.infos():
            s = served.get(info.name)
            running = s.queue.running_for() if s is not None else 0.0
            out.append(ModelHealth(name=info.name, version=info.version,
                                   ready=running <= stuck_after,
                                   queued=s.queue.length if s is not None else 0,
                                   running_ms=int(running * 1e3)))
        return out

    def cancel_queued(self, err: TensordError) -> int:
        """Answer every request still queued, for every model, with err (never run)."""
        return self.engine.cancel_queued(int(err.code), err.message)

    # -- sessions --------------------------------------------------------------------------

    def add_session(self, name: str, seg: Segment, uid: int, high_priority: bool,
                    park_limit: int, on_fatal: Callable[[TensordError], None],
                    on_freed: Callable[[], None]) -> SessionHandle:
        """Hand a session to the core: it maps the segment itself and takes the eventfds
        over (it closes them when it frees the session; no duplicates, so a daemon at its
        descriptor limit needs none more); `seg` (the control plane's mapping) is closed once
        the core freed it."""
        h = seg.header
        sid = self.engine.add_session(name, seg.fd, h.request_ring_capacity,
                                      h.response_ring_capacity, tuple(seg.efds), uid,
                                      high_priority, park_limit)
        seg.own_efds = False
        handle = SessionHandle(self, sid, name, seg, on_fatal, on_freed)
        with self._lock:
            self._sessions[sid] = handle
        return handle

    def set_version(self, handle: SessionHandle, version: int) -> None:
        """The session's protocol version (protocol 4 sessions get errors without fields)."""
        self.engine.set_session_version(handle.sid, version)

    def sessions(self) -> int:
        return self.engine.sessions()

    def _relay(self) -> None:
        """Hands the core's events to the sessions' owners (the control loop's callbacks)."""
        ep = select.epoll()
        ep.register(self.engine.events_fd, select.EPOLLIN)
        while not self._stopping:
            ep.poll(0.5)
            for kind, sid, code, message in self.engine.take_events():
                with self._lock:
                    h = (self._sessions.pop(sid, None) if kind == "freed"
                         else self._sessions.get(sid))
                if kind == "refused":  # the core let at most 10 per 10 s through
                    log.info("session %s: answered %s: %s", h.id[:8] if h else "?",
                             ErrorCode(code).name, message)
                    continue
                if h is None:
                    continue
                if kind == "fatal":
                    h.on_fatal(ProtocolError(message, code=ErrorCode(code), fatal=True))
                else:
                    h.on_freed()
        ep.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the dispatcher, retire every model and wait for running forward passes, at
        most `timeout` s in all (a stuck model must not keep the daemon from exiting)."""
        self.engine.stop()
        self._stopping = True
        with self._lock:
            served = list(self._served.values())
        end = time.monotonic() + timeout
        for s in served:
            for w in s.workers:
                w.join(max(0.0, end - time.monotonic()))
                if w.is_alive():
                    log.warning("model %s: a forward pass is still running; exiting without "
                                "it", s.model.name)
