"""Factories of policy inputs: workers, snapshots, requests."""

from __future__ import annotations

from typing import Any

from disagg.policy.cost import CostModel
from disagg.policy.routing import Load, RouteRequest, Snapshot, WorkerView


def prefill(wid: str, queued: int = 0, **kw: Any) -> WorkerView:
    f = {"free_blocks": 1000, "total_blocks": 1000, "block_size": 16, "running": 0, **kw}
    return WorkerView(wid, f"addr-{wid}", "prefill", queued_prefill_tokens=queued, **f)


def decode(wid: str, free: int = 1000, running: int = 0, **kw: Any) -> WorkerView:
    f = {"total_blocks": 1000, "block_size": 16, "queued_prefill_tokens": 0, **kw}
    return WorkerView(wid, f"addr-{wid}", "decode", free_blocks=free, running=running, **f)


def snap(
    *workers: WorkerView,
    loads: dict[str, Load] | None = None,
    costs: dict[str, CostModel] | None = None,
) -> Snapshot:
    return Snapshot(list(workers), loads or {}, costs or {})


def request(prompt: int = 100, max_tokens: int = 16, **kw: Any) -> RouteRequest:
    return RouteRequest(prompt_tokens=prompt, max_tokens=max_tokens, **kw)
