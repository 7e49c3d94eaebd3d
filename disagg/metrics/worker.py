"""A worker's metrics, read from its engine and NVML at scrape time (nothing in the hot path).

GPU gauges carry the labels worker, role and gpu (the device name). Where NVML
or a GPU is missing only ``disagg:gpu_available 0`` is exposed: no utilization,
memory, clock or power sample at all, so a dashboard shows "no data" rather
than a made-up 0. A metric one device does not report (e.g. power) is left out
the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from disagg.engine.api import EngineStats
from disagg.metrics import names
from disagg.runtime.telemetry import GpuSample, read_gpu_sample


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


_GPU_GAUGES = (
    (
        names.GPU_UTILIZATION,
        "GPU utilization over the last sample period (NVML)",
        "utilization_pct",
    ),
    (names.GPU_MEMORY_USED, "GPU memory in use, every process (NVML)", "memory_used_bytes"),
    (names.GPU_MEMORY_TOTAL, "GPU memory in all (NVML)", "memory_total_bytes"),
    (names.GPU_SM_CLOCK, "SM clock (NVML)", "sm_clock_mhz"),
    (names.GPU_POWER, "Power draw (NVML)", "power_w"),
)


class _GpuCollector(Collector):
    def __init__(self, worker_id: str, role: str, sample: Callable[[], GpuSample]):
        self._labels = [worker_id, role]
        self._sample = sample

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._sample()
        available = GaugeMetricFamily(
            names.GPU_AVAILABLE,
            "1 if NVML reports this worker's GPU, else 0",
            labels=["worker", "role"],
        )
        available.add_metric(self._labels, 1 if s.available else 0)
        yield available
        if not s.available:
            return
        for name, doc, field in _GPU_GAUGES:
            value = getattr(s, field)
            if value is not None:
                g = GaugeMetricFamily(name, doc, labels=["worker", "role", "gpu"])
                g.add_metric([*self._labels, s.name], value)
                yield g


def worker_registry(
    worker_id: str,
    stats: Callable[[], EngineStats | None],
    role: str = "",
    gpu: Callable[[], GpuSample] = read_gpu_sample,
) -> CollectorRegistry:
    """A fresh registry exposing the engine's gauges (stats() returning None = not loaded yet)
    and the GPU's (gpu(): the worker's device, NVML index 0 by default)."""
    registry = CollectorRegistry()
    registry.register(_EngineCollector(worker_id, stats))
    registry.register(_GpuCollector(worker_id, role, gpu))
    return registry
