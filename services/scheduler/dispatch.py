"""The scheduler's prefill dispatch queue: at most ``depth`` prefills per worker at once.

With N scheduler replicas (``replicas``: the live count, from the shared loads)
each replica keeps ``ceil(depth / N)`` in flight per worker, so a worker still
gets about ``depth`` prompts at once and the rest wait in the replicas' queues,
in queue order, instead of in the worker's own FIFO (N x depth prompts there
would undo the shortest-first order: docs/adr/0005).

1. ``slot(worker, expected_ms)``: runs at once while the worker has fewer than
   ``depth`` of our prefills; otherwise waits in that worker's queue.
2. When a slot frees, the next waiter is picked by ``QueueOrder`` (shortest
   expected first, with aging: a long prompt's wait is bounded).
3. A waiter cancelled before its turn leaves the queue; one cancelled just
   after being picked hands its slot on.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from disagg.policy.queue import QueueOrder, Waiting


def _now_ms() -> float:
    return time.monotonic() * 1000


@dataclass
class _Queue:
    running: int = 0
    waiting: dict[int, tuple[Waiting, asyncio.Future[None]]] = field(default_factory=dict)


class PrefillDispatch:
    def __init__(
        self, order: QueueOrder, depth: int, replicas: Callable[[], int] = lambda: 1
    ) -> None:
        if depth <= 0:
            raise ValueError("depth must be > 0")
        self.order = order
        self.total_depth = depth  # per worker, over all replicas
        self._replicas = replicas
        self._queues: dict[str, _Queue] = {}
        self._seq = itertools.count()

    @property
    def depth(self) -> int:
        """This replica's share of a worker's prefills in flight (at least one)."""
        return max(1, -(-self.total_depth // max(1, self._replicas())))

    def waiting(self, worker_id: str) -> int:
        q = self._queues.get(worker_id)
        return len(q.waiting) if q else 0

    @asynccontextmanager
    async def slot(self, worker_id: str, expected_ms: float) -> AsyncIterator[None]:
        q = self._queues.setdefault(worker_id, _Queue())
        if q.running < self.depth and not q.waiting:
            q.running += 1
        else:
            await self._wait(q, expected_ms)
        try:
            yield
        finally:
            self._release(worker_id, q)

    async def _wait(self, q: _Queue, expected_ms: float) -> None:
        key = next(self._seq)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        q.waiting[key] = (Waiting(key, expected_ms, _now_ms()), fut)
        try:
            await fut
        except asyncio.CancelledError:
            if q.waiting.pop(key, None) is None and fut.done() and not fut.cancelled():
                q.running -= 1  # picked, then cancelled: pass the slot on
                self._grant(q)
            raise

    def _release(self, worker_id: str, q: _Queue) -> None:
        q.running -= 1
        self._grant(q)
        if q.running == 0 and not q.waiting:
            self._queues.pop(worker_id, None)

    def _grant(self, q: _Queue) -> None:
        while q.waiting and q.running < self.depth:
            pick = self.order.pick([w for w, _ in q.waiting.values()], _now_ms())
            _, fut = q.waiting.pop(pick.key)
            if not fut.done():
                q.running += 1
                fut.set_result(None)
