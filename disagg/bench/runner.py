"""Sends a workload: each request after its arrival gap, at most max_concurrency in flight.

Duration runs from the first send to the last response, as in vllm bench serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from disagg.bench.backends import RequestResult
from disagg.bench.workload import BenchRequest

Send = Callable[[BenchRequest], Awaitable[RequestResult]]


async def run_workload(
    send: Send,
    requests: list[BenchRequest],
    gaps: list[float],
    max_concurrency: int | None = None,
    progress: bool = True,
) -> tuple[list[RequestResult], float]:
    """(results in request order, duration in seconds)."""
    from tqdm import tqdm

    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), disable=not progress, unit="req", dynamic_ncols=True)

    async def one(req: BenchRequest) -> RequestResult:
        async with limit if limit is not None else contextlib.nullcontext():
            result = await send(req)
        bar.update(1)
        return result

    tasks: list[asyncio.Task[RequestResult]] = []
    start = time.perf_counter()
    for req, gap in zip(requests, gaps, strict=True):
        if gap > 0:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(req)))
    results = list(await asyncio.gather(*tasks))
    duration = time.perf_counter() - start
    bar.close()
    return results, duration


def trace_gaps(requests: list[BenchRequest]) -> list[float] | None:
    """Gaps that replay a trace's timestamps, or None when some request has none."""
    stamps = [r.timestamp for r in requests]
    if any(t is None for t in stamps):
        return None
    out, prev = [], 0.0
    for t in stamps:
        assert t is not None
        out.append(max(0.0, t - prev))
        prev = max(prev, t)
    return out
