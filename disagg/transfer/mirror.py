"""Redis mirrors the local truth: writes in the background, never waited for.

Each side decides a handoff's state locally (the owner's lease table, the
receiver's own outcome) and writes it to Redis for others to see. Nothing on
a request's path waits for those writes: a black-holed Redis (a socket that
accepts and never answers) must not add a millisecond to a prefill or a pull.

1. ``put`` / ``set_state`` / ``drop`` return at once. One request's writes are
   applied in the order issued (one writer task per request id), so a slow
   ``put`` cannot land after the ``drop`` that deletes the record.
2. Each write has its own deadline (``timeout_s``, short): a hung one is
   abandoned, logged and dropped, and the next write of that request runs.
   At most ``MAX_IN_FLIGHT`` writes are in flight (the Redis connection pool
   is shared with the heartbeat); the others wait, and a ``drop`` sheds the
   writes of its request still waiting (the record is deleted anyway), so an
   outage leaves a backlog of at most one drop per ended handoff.
3. A final delete that failed (Redis unreachable when the handoff ended) is
   retried in the background every ``SWEEP_S`` until it lands, so no record
   outlives an outage by more than a sweep; ``GIVE_UP_S`` bounds the retries
   (the record's TTL removes it anyway).
Without a MetaStore (tests of the data plane alone) every write is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from disagg.metastore.store import MetaStore
from disagg.transfer.handle import Handle, handle_to_pb
from disagg.transfer.state import HandoffState, state_to_pb

log = logging.getLogger(__name__)

MIRROR_TIMEOUT_S = 1.0  # deadline of one mirror write
SWEEP_S = 1.0  # how often final deletes that failed are retried
GIVE_UP_S = 120.0  # ... and for how long (the record's TTL removes it anyway)
MAX_IN_FLIGHT = 16  # mirror writes in flight at once
WARN_EVERY_S = 10.0  # during an outage: one warning per this many seconds, with a count

_Write = Callable[[MetaStore], Awaitable[object]]  # bounds its own Redis calls


@dataclass
class _Chain:
    """One request's writes not yet started, and whether its writer waits for a slot."""

    writes: deque[_Write] = field(default_factory=deque)
    waiting: bool = False


class Background:
    """Fire-and-forget tasks, referenced until done (the loop keeps only weak references)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Waits until every task spawned so far (and any they spawn) is done."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class RedisMirror:
    def __init__(self, store: MetaStore | None, timeout_s: float | None = None) -> None:
        """timeout_s: each write's deadline (None: ``MIRROR_TIMEOUT_S``)."""
        self._store = store
        self._timeout_s = MIRROR_TIMEOUT_S if timeout_s is None else timeout_s
        self.background = Background()
        self._chains: dict[str, _Chain] = {}  # request id -> its writes not yet started
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._undone: dict[str, float] = {}  # request id -> when to stop retrying its delete
        self._sweeper: asyncio.Task[None] | None = None
        self._warned_at = float("-inf")  # last failure warning
        self._unwarned = 0  # failures since then, not logged one by one

    @property
    def pending_deletes(self) -> int:
        """Final deletes that failed and are being retried."""
        return len(self._undone)

    def put(self, handle: Handle, state: HandoffState, ttl_s: float) -> None:
        """Background: publishes the record (it expires after ttl_s)."""
        record = handle_to_pb(handle, state)
        self._undone.pop(handle.request_id, None)  # a new record under an old id: not stale
        self._enqueue(handle.request_id, lambda s: self._bounded(s.put_kv_handle(record, ttl_s)))

    def set_state(
        self, request_id: str, state: HandoffState, expected: HandoffState | None = None
    ) -> None:
        """Background compare-and-set; a record already past ``expected`` is left alone."""
        want = None if expected is None else {state_to_pb(expected)}

        self._enqueue(
            request_id,
            lambda s: self._bounded(s.set_kv_state(request_id, state_to_pb(state), want)),
        )

    def drop(self, request_id: str, final: HandoffState) -> None:
        """Background: the record's final state, then the record is deleted."""
        chain = self._chains.get(request_id)
        if chain is not None and chain.waiting:  # none of them started: superseded
            chain.writes.clear()
        self._enqueue(request_id, lambda s: self._drop(s, request_id, final))

    def close(self) -> None:
        """Stops retrying failed deletes (the records expire by TTL)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._undone.clear()

    def _enqueue(self, request_id: str, write: _Write) -> None:
        if self._store is None:
            return
        chain = self._chains.get(request_id)
        if chain is not None:  # its writer is running: this write comes next
            chain.writes.append(write)
            return
        self._chains[request_id] = _Chain(deque([write]))
        self.background.spawn(self._write_in_order(self._store, request_id))

    async def _write_in_order(self, store: MetaStore, request_id: str) -> None:
        chain = self._chains[request_id]
        try:
            while chain.writes:
                chain.waiting = True
                async with self._slots:
                    chain.waiting = False
                    if chain.writes:
                        await chain.writes.popleft()(store)
        finally:
            del self._chains[request_id]

    async def _drop(self, store: MetaStore, request_id: str, final: HandoffState) -> None:
        await self._bounded(store.set_kv_state(request_id, state_to_pb(final), None))
        if not await self._bounded(store.delete_kv_handle(request_id)):
            self._retry_delete(request_id)

    async def _bounded(self, write: Awaitable[object], quiet: bool = False) -> bool:
        """True when the write landed within the deadline; a failure is logged."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await write
        except Exception as e:
            self._failed(e, quiet)
            return False
        return True

    def _failed(self, e: Exception, quiet: bool) -> None:
        """Logs a failed write: at most one warning per ``WARN_EVERY_S`` (an outage fails
        every write; one line per write would flood the log), the rest counted into it."""
        now = time.monotonic()
        if quiet or now - self._warned_at < WARN_EVERY_S:
            self._unwarned += not quiet
            log.debug("metastore update failed: %s", e or type(e).__name__)
            return
        more = f" ({self._unwarned} more since the last warning)" if self._unwarned else ""
        log.warning("metastore update failed: %s%s", e or type(e).__name__, more)
        self._warned_at, self._unwarned = now, 0

    def _retry_delete(self, request_id: str) -> None:
        self._undone[request_id] = time.monotonic() + GIVE_UP_S
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Retries the failed deletes until each lands (or is given up)."""
        assert self._store is not None
        while self._undone:
            await asyncio.sleep(SWEEP_S)
            for request_id, give_up_at in list(self._undone.items()):
                if request_id in self._chains or request_id not in self._undone:
                    continue  # its writer is busy (a new handoff under the id): next round
                if await self._bounded(self._store.delete_kv_handle(request_id), quiet=True):
                    self._undone.pop(request_id, None)
                elif time.monotonic() > give_up_at:
                    self._undone.pop(request_id, None)
                else:
                    break  # Redis still unreachable: the rest next round
