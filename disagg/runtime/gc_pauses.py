"""The garbage collector in a serving process: fewer objects to scan, and its pauses measured.

CPython's cyclic collector stops the process while it scans. A full (generation 2)
collection scans every tracked object, and a service's startup leaves hundreds of
thousands of them (the imported modules of transformers and grpc, the tokenizer):
measured in a scheduler (``benchmarks/policy_compare.py``), ~350 k objects, a full
collection every few seconds under load, each one 130-230 ms with one replica and
300-520 ms with two sharing the CPU. Every stream in flight stalls for it, and
every request that arrives meanwhile waits before the scheduler even sees it: the
p99 TTFT was made of these stalls. ``freeze_startup`` moves what startup made into
the permanent generation (``gc.freeze``), which no collection scans: full
collections then scan what serving made (~15 k objects there) and the stalls were
gone from the trace. Workers hold more (torch, the model): an overloaded decode
worker of SmolLM2 stood still twice for ~660 ms in one of two runs with Python's
defaults, never while serving in two runs frozen. The frozen objects are never
freed by the collector, which is right for what lives as long as the process (and
reference counting still frees the rest).

``GcPauses`` hands the duration of every collection to a callback (the service's
``disagg:gc_pause_seconds`` histogram), so a stall of this kind shows on /metrics.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any


def freeze_startup() -> None:
    """Collects once, then leaves every object alive now out of later collections."""
    gc.collect()
    gc.freeze()


class GcPauses:
    """Times the collector's passes of this process while installed:
    ``observe(generation, seconds)`` after each."""

    def __init__(self, observe: Callable[[int, float], None]) -> None:
        self._observe = observe
        self._started = 0.0

    def install(self) -> GcPauses:
        gc.callbacks.append(self._on_gc)
        return self

    def remove(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._observe(info["generation"], time.perf_counter() - self._started)
