"""Metrics of a service's process itself (not of its requests)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram

from disagg.metrics import names


def gc_pause_observer(registry: CollectorRegistry) -> Callable[[int, float], None]:
    """``disagg:gc_pause_seconds{generation}`` in registry; the returned function
    observes one collection (generation, seconds), e.g. for ``runtime.gc_pauses.GcPauses``."""
    hist = Histogram(
        names.GC_PAUSE,
        "Time the process stood still in a garbage collection, by generation",
        ["generation"],
        buckets=names.GC_PAUSE_BUCKETS,
        registry=registry,
    )
    by_generation = [hist.labels(str(g)) for g in range(3)]

    def observe(generation: int, seconds: float) -> None:
        by_generation[generation].observe(seconds)

    return observe
