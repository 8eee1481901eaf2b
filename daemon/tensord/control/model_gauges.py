"""Per-model gauges read at scrape time (issue 17.9): queue depth, readiness and the age of
the oldest running forward pass, from the scheduler's own health report, plus the daemon's
readiness (what `tensord health` answers). Nothing is recorded between scrapes, so the
request path pays nothing for them. A small collector of its own beside metrics.py."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .. import metrics
from ..contract.messages import HealthReport


class ModelGauges(Collector):
    def __init__(self, health: Callable[[], HealthReport]):
        self._health = health

    def collect(self):
        h = self._health()
        depth = GaugeMetricFamily("tensord_model_queue_depth", "Requests waiting in the "
                                  "model's queue now", labels=["model"])
        ready = GaugeMetricFamily("tensord_model_ready", "1 while the model can serve: no "
                                  "forward pass of it has run longer than stuck_after_s",
                                  labels=["model"])
        running = GaugeMetricFamily("tensord_model_running_seconds", "Age of the model's "
                                    "oldest forward pass running now (0: none)",
                                    labels=["model"])
        for m in h.models:
            depth.add_metric([m.name], m.queued)
            ready.add_metric([m.name], 1 if m.ready else 0)
            running.add_metric([m.name], m.running_ms / 1e3)
        yield depth
        yield ready
        yield running
        yield GaugeMetricFamily("tensord_ready", "1 while the daemon is ready (what `tensord "
                                "health` answers): not draining, no model stuck",
                                value=1 if h.ready else 0)
        yield GaugeMetricFamily("tensord_draining", "1 while the daemon drains (SIGTERM)",
                                value=1 if h.draining else 0)


def register(health: Callable[[], HealthReport]) -> ModelGauges:
    g = ModelGauges(health)
    metrics.REGISTRY.register(g)
    return g


def unregister(g: ModelGauges) -> None:
    metrics.REGISTRY.unregister(g)
