"""Redis mirrors the local truth: writes in the background, an outage logged, not fatal.

Each side decides a handoff's state locally (the owner's lease table, the
receiver's own outcome) and writes it to Redis for others to see. A write that
fails is logged and dropped: the record's TTL cleans up after it. Without a
MetaStore (tests of the data plane alone) every write is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from disagg.metastore.store import MetaStore
from disagg.transfer.handle import Handle, handle_to_pb
from disagg.transfer.state import HandoffState, state_to_pb

log = logging.getLogger(__name__)


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
    def __init__(self, store: MetaStore | None) -> None:
        self._store = store
        self.background = Background()

    async def put(self, handle: Handle, state: HandoffState, ttl_s: float) -> None:
        """Publishes the record and waits for it: a caller that answers after this
        has made the handle visible to anyone who looks (unless Redis is down)."""
        if self._store is not None:
            await _logged(self._store.put_kv_handle(handle_to_pb(handle, state), ttl_s))

    def set_state(
        self, request_id: str, state: HandoffState, expected: HandoffState | None = None
    ) -> None:
        """Background compare-and-set; a record already past ``expected`` is left alone."""
        if self._store is None:
            return
        want = None if expected is None else {state_to_pb(expected)}
        self.background.spawn(
            _logged(self._store.set_kv_state(request_id, state_to_pb(state), want))
        )

    def drop(self, request_id: str, final: HandoffState) -> None:
        """Background: the record's final state, then the record is deleted."""
        if self._store is not None:
            self.background.spawn(self._drop(self._store, request_id, final))

    @staticmethod
    async def _drop(store: MetaStore, request_id: str, final: HandoffState) -> None:
        await _logged(store.set_kv_state(request_id, state_to_pb(final), None))
        await _logged(store.delete_kv_handle(request_id))


async def _logged(coro: Coroutine[Any, Any, object]) -> None:
    try:
        await coro
    except Exception as e:
        log.warning("metastore update failed: %s", e)
