"""gRPC PrefillWorker: Prefill -> (PullKv) -> ReleaseKv, with leases.

1. Prefill: the engine runs the prompt (PREFILL_ONLY), samples the first
   token and holds the blocks; the handle goes to Redis as READY with a lease.
2. PullKv: one decode worker streams the blocks (READY -> TRANSFERRING).
3. ReleaseKv: CONSUMED after a completed pull, FAILED on cancel; blocks freed.
   A lease that runs out first frees them as EXPIRED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from disagg.engine.api import Engine, FinishReason, RequestMode
from disagg.metastore.store import MetaStore
from disagg.runtime.config import WorkerConfig
from disagg.transfer.chunks import plan_chunks
from disagg.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from disagg.wire import layout_to_pb, sampling_from_pb
from disagg.worker.bridge import run_request
from disagg.worker.validation import validate_prompt
from services.prefill.leases import LeaseTable

log = logging.getLogger(__name__)

_OUTCOME_STATE: dict[str, common_pb2.KvState] = {
    "consumed": common_pb2.KV_STATE_CONSUMED,
    "failed": common_pb2.KV_STATE_FAILED,
    "expired": common_pb2.KV_STATE_EXPIRED,
}


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(
        self, engine: Engine, store: MetaStore, cfg: WorkerConfig, worker_id: str, address: str
    ):
        self._engine = engine
        self._store = store
        self._cfg = cfg
        self._worker_id = worker_id
        self._address = address
        self._leases = LeaseTable(cfg.kv_lease_s, self._free)
        self._tasks: set[asyncio.Task[None]] = set()
        self.freed: dict[str, int] = {"consumed": 0, "failed": 0, "expired": 0}

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        rid = request.request_id
        ids = list(request.prompt_token_ids)
        await validate_prompt(self._engine, ids, context)
        try:
            sampling = sampling_from_pb(request.sampling)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{e}")
        if not rid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: required")
        if self._engine.held_blocks(rid) is not None:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"request_id: {rid!r} already holds KV here; release it or use a new id",
            )
        async with contextlib.aclosing(
            run_request(self._engine, rid, ids, sampling, RequestMode.PREFILL_ONLY)
        ) as stream:
            outs = [o async for o in stream]  # one output: the first token (or an error)
        out = outs[-1]
        if out.finish is not FinishReason.PREFILLED:
            await context.abort(
                grpc.StatusCode.INTERNAL, f"prefill failed: {out.error or out.finish}"
            )
        held = self._engine.held_blocks(rid)
        if held is None:
            await context.abort(grpc.StatusCode.INTERNAL, "prefill finished but holds no KV")
            raise AssertionError  # unreachable
        self._leases.hold(rid)
        handle = common_pb2.KvHandle(
            request_id=rid,
            owner_worker_id=self._worker_id,
            owner_address=self._address,
            block_ids=held[0],
            num_tokens=held[1],
            layout=layout_to_pb(self._engine.info.layout),
            state=common_pb2.KV_STATE_READY,
            lease_expires_unix_ms=int((time.time() + self._cfg.kv_lease_s) * 1000),
            first_token_id=out.token_ids[0],
        )
        try:
            await self._mirror(self._store.put_kv_handle(handle, self._cfg.kv_lease_s + 5))
        except asyncio.CancelledError:
            self._leases.finish(rid, consumed=False)  # the caller is gone: nobody will pull
            raise
        return worker_pb2.PrefillResponse(
            handle=handle,
            queue_ms=out.queue_ms or 0.0,
            prefill_ms=out.prefill_ms or 0.0,
            cached_tokens=out.cached_tokens,
        )

    async def PullKv(self, request: worker_pb2.PullKvRequest, context: grpc.aio.ServicerContext):  # type: ignore[override]
        rid = request.request_id
        held = self._engine.held_blocks(rid)
        if held is None or not self._leases.begin_transfer(rid):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no KV ready for request {rid!r} (expired, released or being pulled)",
            )
            return
        await self._mirror(
            self._store.set_kv_state(
                rid, common_pb2.KV_STATE_TRANSFERRING, {common_pb2.KV_STATE_READY}
            )
        )
        block_ids = held[0]
        max_bytes = request.max_chunk_bytes or self._cfg.max_chunk_bytes
        for span in plan_chunks(self._engine.info.layout, len(block_ids), max_bytes):
            # Released or expired mid-pull: the blocks may already belong to another request.
            if not self._leases.transferring(rid):
                await context.abort(
                    grpc.StatusCode.ABORTED, f"KV of {rid!r} was freed during the pull"
                )
                return
            blocks = block_ids[span.first_block : span.first_block + span.num_blocks]
            k, v = self._engine.read_kv(blocks, span.layer)
            yield worker_pb2.KvChunk(
                layer=span.layer, first_block=span.first_block, num_blocks=span.num_blocks, k=k, v=v
            )

    async def ReleaseKv(
        self, request: worker_pb2.ReleaseKvRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReleaseKvResponse:
        return worker_pb2.ReleaseKvResponse(
            released=self._leases.finish(request.request_id, request.consumed)
        )

    def held_count(self) -> int:
        return len(self._leases)

    def close(self) -> None:
        self._leases.close()

    def _free(self, request_id: str, outcome: str) -> None:
        self._engine.release(request_id)
        self.freed[outcome] += 1
        if outcome == "expired":
            log.warning("kv lease expired request_id=%s", request_id)
        task = asyncio.get_running_loop().create_task(
            self._drop_handle(request_id, _OUTCOME_STATE[outcome])
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drop_handle(self, request_id: str, state: common_pb2.KvState) -> None:
        await self._mirror(self._store.set_kv_state(request_id, state, None))
        await self._mirror(self._store.delete_kv_handle(request_id))

    async def _mirror(self, coro) -> None:  # type: ignore[no-untyped-def]
        """Redis mirrors the local truth; an outage is logged, not fatal."""
        try:
            await coro
        except Exception as e:
            log.warning("metastore update failed: %s", e)
