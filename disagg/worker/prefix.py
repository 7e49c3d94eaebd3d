"""The worker publishes its own prefix cache, so every scheduler replica routes on the truth.

1. Every heartbeat period the publisher asks the engine for its cached block
   hashes and their version (bumped by the allocator on every register or
   eviction).
2. A new version: the whole set is written (``PrefixSet`` under
   ``<namespace>:prefix:{worker_id}``, with the heartbeat's TTL). The same
   version: only the TTL is renewed, unless the set is gone (it expired while
   Redis was unreachable, or Redis restarted empty): then it is written again.
3. The worker dies or restarts: the set expires with the TTL; a restarted worker
   has a new worker id, so no stale entry can ever be read as its own.
Schedulers read a worker's set only when its version changed
(``WorkerRegistry``). A Redis outage is logged and retried next period.
"""

from __future__ import annotations

import asyncio
import logging

from disagg.engine.api import Engine
from disagg.metastore.store import MetaStore
from disagg.runtime.shutdown import cancel_and_wait
from disagg.v1 import control_pb2

log = logging.getLogger(__name__)


class PrefixPublisher:
    def __init__(
        self, store: MetaStore, engine: Engine, worker_id: str, period_s: float, ttl_s: float
    ):
        self._store = store
        self._engine = engine
        self._worker_id = worker_id
        self._period_s = period_s
        self._ttl_s = ttl_s
        self._published: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def publish(self) -> None:
        """Writes the set if it changed since the last write, else renews its TTL."""
        version, hashes = self._engine.cached_prefix()
        if version == self._published and await self._store.touch_prefix_set(
            self._worker_id, self._ttl_s
        ):
            return
        record = control_pb2.PrefixSet(
            worker_id=self._worker_id, version=version, block_hashes=hashes
        )
        await self._store.put_prefix_set(record, self._ttl_s)
        self._published = version

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        # The loop also ends at its next turn if the cancel is lost (cancel_and_wait).
        self._stopped = True
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while not self._stopped:
            try:
                # A publish stuck on a black-holed Redis is dropped after a TTL: the next
                # one tries afresh rather than waiting out every socket timeout and retry.
                async with asyncio.timeout(self._ttl_s):
                    await self.publish()
            except Exception as e:
                log.warning("prefix cache publish failed: %s", e or type(e).__name__)
            await asyncio.sleep(self._period_s)
