"""The scheduler's view of the workers: Redis heartbeats + its own in-flight accounting.

1. Heartbeats: every ``refresh_s`` the worker records are re-read from Redis and
   turned into policy ``WorkerView``s once (not per request); a change bumps
   ``version`` so the decision log writes the views only when they change.
2. Loads: what this scheduler has sent to each worker and not seen finish --
   prefills queued or running (requests, uncached tokens) and decode streams
   (requests, KV blocks). Exact and immediate, where heartbeats lag.
3. Cost models: each observed ``prefill_ms`` refines that worker's model.
4. Prefix index: prompts prefilled on a worker are recorded there, in this
   scheduler's memory only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from disagg.metastore.store import MetaStore
from disagg.policy.cost import CostModel
from disagg.policy.prefix import PrefixIndex
from disagg.policy.routing import NO_LOAD, Decision, Load, Snapshot, WorkerView, blocks_needed
from disagg.v1 import common_pb2

log = logging.getLogger(__name__)

RESTARTS_REFRESH_S = 2.0  # how often the supervisor's restart counts are re-read

_ROLE = {common_pb2.WORKER_ROLE_PREFILL: "prefill", common_pb2.WORKER_ROLE_DECODE: "decode"}


def view_of(i: common_pb2.WorkerInfo) -> WorkerView:
    return WorkerView(
        worker_id=i.worker_id,
        address=i.address,
        role=_ROLE.get(i.role, "unknown"),
        free_blocks=i.free_blocks,
        total_blocks=i.total_blocks,
        block_size=i.layout.block_size or 1,
        queued_prefill_tokens=i.queued_prefill_tokens,
        running=i.running_requests,
        waiting=i.waiting_requests,
    )


@dataclass
class Reservation:
    """One request's share of the loads; undone piecewise as its phases end."""

    prefill_worker: str  # where its prompt is prefilled (a decode worker when local)
    prefill_tokens: int
    decode_worker: str
    decode_blocks: int
    prefill_open: bool = True


class WorkerRegistry:
    def __init__(self, store: MetaStore, refresh_s: float, prior: CostModel | None = None):
        self._store = store
        self._refresh_s = refresh_s
        self._infos: list[common_pb2.WorkerInfo] = []
        self._views: list[WorkerView] = []
        self.version = 0
        self.loads: dict[str, Load] = {}
        self.costs: dict[str, CostModel] = {}
        self._prior = prior or CostModel()
        self.prefix = PrefixIndex()
        self.on_cost: Callable[[str, CostModel], None] | None = None  # decision log hook
        self.restarts: dict[str, int] = {}  # service -> restarts by `disagg up` (for /metrics)
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
            self.set_infos(await self._store.list_workers())
        except Exception as e:
            log.warning("worker registry refresh failed: %s", e)

    def set_infos(self, infos: list[common_pb2.WorkerInfo]) -> None:
        self._infos = infos
        views = sorted((view_of(i) for i in infos), key=lambda v: v.worker_id)
        if views != self._views:
            gone = {v.worker_id for v in self._views} - {v.worker_id for v in views}
            for w in gone:
                self.prefix.drop_worker(w)
            for v in views:
                self.prefix.set_capacity(v.worker_id, v.total_blocks)
            for i in infos:
                self._seed_cost(i)
            self._views = views
            self.version += 1

    def _seed_cost(self, info: common_pb2.WorkerInfo) -> None:
        """A worker's own startup measurement replaces the prior until we observe it."""
        if info.worker_id in self.costs or info.prefill_base_ms + info.prefill_ms_per_token <= 0:
            return
        model = CostModel(base_ms=info.prefill_base_ms, per_token_ms=info.prefill_ms_per_token)
        self.costs[info.worker_id] = model
        if self.on_cost is not None:
            self.on_cost(info.worker_id, model)

    def infos(self) -> list[common_pb2.WorkerInfo]:
        return list(self._infos)

    def snapshot(self) -> list[WorkerView]:
        return self._views

    def policy_snapshot(self) -> Snapshot:
        """The live loads and costs: decide from it before the next await."""
        return Snapshot(self.snapshot(), self.loads, self.costs)

    # --- in-flight accounting ------------------------------------------------------------

    def reserve(self, d: Decision, prompt_tokens: int, max_tokens: int) -> Reservation:
        pre = d.prefill.worker_id if d.prefill else d.decode.worker_id
        r = Reservation(
            pre,
            d.uncached_tokens,
            d.decode.worker_id,
            blocks_needed(prompt_tokens, max_tokens, d.decode.block_size),
        )
        self._add(r.prefill_worker, 1, r.prefill_tokens, 0)
        self._add(r.decode_worker, 0 if d.prefill is None else 1, 0, r.decode_blocks)
        return r

    def prefill_done(self, r: Reservation) -> None:
        if r.prefill_open:
            r.prefill_open = False
            local = r.prefill_worker == r.decode_worker
            self._add(r.prefill_worker, 0 if local else -1, -r.prefill_tokens, 0)

    def release(self, r: Reservation) -> None:
        self.prefill_done(r)
        self._add(r.decode_worker, -1, 0, -r.decode_blocks)

    def _add(self, worker_id: str, requests: int, tokens: int, blocks: int) -> None:
        old = self.loads.get(worker_id, NO_LOAD)
        new = Load(old.requests + requests, old.tokens + tokens, old.blocks + blocks)
        if new == NO_LOAD:
            self.loads.pop(worker_id, None)
        else:
            self.loads[worker_id] = new

    # --- learning ------------------------------------------------------------------------

    def observe_prefill(self, worker_id: str, tokens: int, ms: float) -> None:
        if ms <= 0:
            return
        new = self.costs.get(worker_id, self._prior).refined(tokens, ms)
        self.costs[worker_id] = new
        if self.on_cost is not None:
            self.on_cost(worker_id, new)

    def record_prefix(self, worker_id: str, hashes: Sequence[bytes]) -> None:
        if hashes:
            self.prefix.record(worker_id, hashes)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        restarts_due = 0.0
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()
            if loop.time() >= restarts_due:  # a rare event: no need to read it every refresh
                restarts_due = loop.time() + RESTARTS_REFRESH_S
                await self._refresh_restarts()

    async def _refresh_restarts(self) -> None:
        try:
            self.restarts = await self._store.restarts()
        except Exception as e:
            log.warning("reading service restarts failed: %s", e)
