"""Sizing the front: how many scheduler replicas a cluster's traffic needs.

Every request and every token passes through a scheduler replica, a
single-threaded process: its CPU per request (admission, routing, the worker
RPCs) and per relayed token (protobuf, detokenization, stop strings) are
measured by ``benchmarks/scheduler.py`` (``request_cpu_ms``, ``token_cpu_us``).
A replica is planned at ``core_budget`` of one core, leaving headroom for
bursts and for the event loop's latency; the count is rounded up and is at
least ``min_replicas`` (two: losing one replica must not lose the front).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FrontCost:
    request_cpu_ms: float  # scheduler CPU per request, its first token included
    token_cpu_us: float  # scheduler CPU per further relayed token
    core_budget: float = 0.6  # share of one core a replica is planned to use
    min_replicas: int = 2
    source: str = ""  # where the figures came from

    def __post_init__(self) -> None:
        if self.request_cpu_ms < 0 or self.token_cpu_us < 0:
            raise ValueError("scheduler CPU costs must be >= 0")
        if not 0 < self.core_budget <= 1 or self.min_replicas < 1:
            raise ValueError("core_budget must be in (0, 1] and min_replicas >= 1")

    def cores(self, requests_per_s: float, tokens_per_s: float) -> float:
        """Scheduler cores this traffic keeps busy."""
        return requests_per_s * self.request_cpu_ms / 1e3 + tokens_per_s * self.token_cpu_us / 1e6

    def replicas(self, requests_per_s: float, tokens_per_s: float) -> int:
        need = math.ceil(self.cores(requests_per_s, tokens_per_s) / self.core_budget - 1e-9)
        return max(self.min_replicas, need)


def front_cost(data: Mapping[str, Any], source: str) -> FrontCost:
    """From ``benchmarks/scheduler.py``'s JSON (its first run) or a profile's ``scheduler`` key."""
    run = data["runs"][0] if "runs" in data else data
    return FrontCost(float(run["request_cpu_ms"]), float(run["token_cpu_us"]), source=source)
