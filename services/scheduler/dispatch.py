"""The scheduler's prefill dispatch queue: at most ``depth`` prefills per worker at once.

1. ``slot(worker, expected_ms)``: runs at once while the worker has fewer than
   ``depth`` prefills in flight; otherwise waits in that worker's queue.
2. When a slot frees, the next waiter is picked by ``QueueOrder`` (shortest
   expected first, with aging: a long prompt's wait is bounded).
3. A waiter cancelled before its turn leaves the queue; one cancelled just
   after being picked hands its slot on.

With N scheduler replicas the depth is the worker's, over all of them
(docs/adr/0005). Each replica publishes, per worker, its prefills in flight and
the global rank of its best waiter (``state``, in its pushed loads) and reads
its peers' (``peers``): a waiter starts when the worker's prefills over all
replicas are under ``depth`` and no peer's waiter ranks before it, so a free
slot goes to the best waiter of any replica, not to whoever sees it first. The
peers' figures are a push old (milliseconds); a waiter that deferred to a
peer's better-ranked one goes anyway after ``DEFER_MAX_S`` if the slot is still
free (the peer's waiter was gone, or the peer saw the slot late). ``kick``
re-checks the queues when the peers' figures change. Without peers' figures
(``peers`` None) each of the N replicas keeps ``ceil(depth / N)``.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from disagg.policy.queue import QueueOrder, Waiting


def _now_ms() -> float:
    return time.monotonic() * 1000


DEFER_MAX_S = 0.02  # a waiter deferring to a peer's better one goes after this if still free


@dataclass(frozen=True)
class PeerSlots:
    """One worker's prefills as the other replicas last published them."""

    running: int = 0  # their prefills in flight on it
    head: float = math.inf  # the global rank (``global_rank``) of their best waiter


NO_PEERS = PeerSlots()


@dataclass
class _Queue:
    running: int = 0
    waiting: dict[int, tuple[Waiting, asyncio.Future[None]]] = field(default_factory=dict)
    deferred_at: float | None = None  # monotonic s: the head first deferred to a peer's


class PrefillDispatch:
    def __init__(
        self,
        order: QueueOrder,
        depth: int,
        replicas: Callable[[], int] = lambda: 1,
        peers: Callable[[str], PeerSlots] | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        """peers: the other replicas' slots on a worker (None: split the depth instead);
        on_change: called when ``state`` changed (this replica's loads are pushed)."""
        if depth <= 0:
            raise ValueError("depth must be > 0")
        self.order = order
        self.total_depth = depth  # per worker, over all replicas
        self._replicas = replicas
        self._peers = peers
        self._on_change = on_change
        self._queues: dict[str, _Queue] = {}
        self._seq = itertools.count()

    @property
    def depth(self) -> int:
        """This replica's share of a worker's prefills in flight (at least one); the whole
        depth when the peers' slots are known (then they are counted instead)."""
        if self._peers is not None:
            return self.total_depth
        return max(1, -(-self.total_depth // max(1, self._replicas())))

    def global_rank(self, w: Waiting, now_ms: float) -> float:
        """w's rank among every replica's waiters (lower first): the wall-clock ms at which
        its aged priority reaches zero, or its wait bound. It does not change as time
        passes, so peers can compare ranks published a push ago."""
        order = self.order
        due = order.max_wait_ms
        if order.aging > 0:
            due = min(w.expected_ms / order.aging, due)
        return time.time() * 1000 - (now_ms - w.enqueued_ms) + due

    def state(self) -> dict[str, tuple[int, float]]:
        """worker -> (prefills in flight, global rank of the best waiter or 0): what
        this replica publishes for its peers."""
        now = _now_ms()
        out = {}
        for worker_id, q in self._queues.items():
            head = 0.0
            if q.waiting:
                best = self.order.pick([w for w, _ in q.waiting.values()], now)
                head = self.global_rank(best, now)
            out[worker_id] = (q.running, head)
        return out

    def kick(self) -> None:
        """The peers' slots changed: start what may start now."""
        started = False
        for worker_id, q in list(self._queues.items()):
            if q.waiting:
                started |= self._grant(worker_id, q)
        if started:
            self._on_change()

    def _may_start(self, worker_id: str, q: _Queue, w: Waiting) -> bool:
        """Whether w (the queue's best waiter, or a prefill that found no queue) may
        start on the worker now."""
        if self._peers is None or self._replicas() <= 1:
            return q.running < self.depth
        peer = self._peers(worker_id)
        if q.running + peer.running >= self.total_depth:
            q.deferred_at = None  # no slot to leave to anyone
            return False
        now = _now_ms()
        if self.global_rank(w, now) <= peer.head:
            return True
        if q.deferred_at is None:  # a peer's waiter ranks first: let it take the slot
            q.deferred_at = now / 1000
            asyncio.get_running_loop().call_later(DEFER_MAX_S, self.kick)
            return False
        return now / 1000 - q.deferred_at >= DEFER_MAX_S

    def waiting(self, worker_id: str) -> int:
        q = self._queues.get(worker_id)
        return len(q.waiting) if q else 0

    @asynccontextmanager
    async def slot(self, worker_id: str, expected_ms: float) -> AsyncIterator[None]:
        q = self._queues.setdefault(worker_id, _Queue())
        w = Waiting(next(self._seq), expected_ms, _now_ms())
        if not q.waiting and self._may_start(worker_id, q, w):
            q.running += 1
            self._on_change()
        else:
            await self._wait(worker_id, q, w)
        try:
            yield
        finally:
            self._release(worker_id, q)

    async def _wait(self, worker_id: str, q: _Queue, w: Waiting) -> None:
        key = w.key
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        q.waiting[key] = (w, fut)
        self._grant(worker_id, q)  # it may start at once, or be our new best waiter
        self._on_change()
        try:
            await fut
        except asyncio.CancelledError:
            if q.waiting.pop(key, None) is None and fut.done() and not fut.cancelled():
                q.running -= 1  # picked, then cancelled: pass the slot on
            self._changed(worker_id, q)
            raise

    def _release(self, worker_id: str, q: _Queue) -> None:
        q.running -= 1
        self._changed(worker_id, q)

    def _changed(self, worker_id: str, q: _Queue) -> None:
        """After a slot freed or a waiter left: the next may start; state published."""
        self._grant(worker_id, q)
        if q.running == 0 and not q.waiting and self._queues.get(worker_id) is q:
            del self._queues[worker_id]
        self._on_change()

    def _grant(self, worker_id: str, q: _Queue) -> bool:
        """Starts the waiters that may start now, best first; whether any did."""
        started = False
        while q.waiting:
            pick = self.order.pick([w for w, _ in q.waiting.values()], _now_ms())
            if not self._may_start(worker_id, q, pick):
                break
            q.deferred_at = None
            _, fut = q.waiting.pop(pick.key)
            if not fut.done():
                q.running += 1
                fut.set_result(None)
                started = True
        return started
