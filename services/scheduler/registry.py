"""The scheduler's view of the workers: Redis heartbeats + its own in-flight counts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter

from disagg.metastore.store import MetaStore
from disagg.policy.routing import WorkerView
from disagg.v1 import common_pb2

log = logging.getLogger(__name__)

_ROLE = {common_pb2.WORKER_ROLE_PREFILL: "prefill", common_pb2.WORKER_ROLE_DECODE: "decode"}


class WorkerRegistry:
    def __init__(self, store: MetaStore, refresh_s: float):
        self._store = store
        self._refresh_s = refresh_s
        self._infos: list[common_pb2.WorkerInfo] = []
        self._inflight: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> None:
        try:
            self._infos = await self._store.list_workers()
        except Exception as e:
            log.warning("worker registry refresh failed: %s", e)

    def infos(self) -> list[common_pb2.WorkerInfo]:
        return list(self._infos)

    def snapshot(self) -> list[WorkerView]:
        return [
            WorkerView(
                worker_id=i.worker_id,
                address=i.address,
                role=_ROLE.get(i.role, "unknown"),
                free_blocks=i.free_blocks,
                total_blocks=i.total_blocks,
                block_size=i.layout.block_size or 1,
                queued_prefill_tokens=i.queued_prefill_tokens,
                running=i.running_requests,
                inflight=self._inflight[i.worker_id],
            )
            for i in self._infos
        ]

    @contextlib.contextmanager
    def track(self, worker_id: str):  # type: ignore[no-untyped-def]
        """Counts a request as in flight on worker_id for the duration of the block."""
        self._inflight[worker_id] += 1
        try:
            yield
        finally:
            self._inflight[worker_id] -= 1
            if self._inflight[worker_id] <= 0:
                del self._inflight[worker_id]

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()
