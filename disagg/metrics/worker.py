"""A worker's metrics, read from its engine at scrape time (nothing to update in the hot path)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from disagg.engine.api import EngineStats
from disagg.metrics import names


class _EngineCollector(Collector):
    def __init__(self, worker_id: str, stats: Callable[[], EngineStats | None]):
        self._worker_id = worker_id
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._stats()
        if s is None:  # engine not loaded yet
            return
        yield GaugeMetricFamily(names.RUNNING, "Requests in the decode batch", value=s.running)
        yield GaugeMetricFamily(names.WAITING, "Requests waiting to be scheduled", value=s.waiting)
        for name, doc, value in (
            (names.BLOCKS_USED, "KV blocks in use", s.total_blocks - s.free_blocks),
            (names.BLOCKS_TOTAL, "KV blocks in the pool", s.total_blocks),
        ):
            g = GaugeMetricFamily(name, doc, labels=["worker"])
            g.add_metric([self._worker_id], value)
            yield g


def worker_registry(worker_id: str, stats: Callable[[], EngineStats | None]) -> CollectorRegistry:
    """A fresh registry exposing the engine's gauges (stats() returning None = not loaded yet)."""
    registry = CollectorRegistry()
    registry.register(_EngineCollector(worker_id, stats))
    return registry
