"""gRPC DecodeWorker: take a handoff, pull its KV, continue generation.

1. Reserve blocks for the prompt's KV in the local pool.
2. Pull the blocks from the prefill worker (chunked stream, bounded by
   transfer_timeout_s); every (layer, block) must arrive exactly once.
3. Tell the prefill worker to release (CONSUMED on success, FAILED otherwise).
4. Submit to the engine in DECODE mode: it continues after the first token.
   If the pull failed, the prompt (+ first token) is prefilled here instead,
   so the client still gets a correct stream.
Without a handle the prompt is prefilled here (short prompts, fallbacks).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from disagg.engine.api import Engine, FinishReason, RequestMode, SamplingParams
from disagg.metastore.store import MetaStore
from disagg.runtime.config import WorkerConfig
from disagg.transfer.chunks import ChunkTracker, TransferError
from disagg.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from disagg.wire import layout_from_pb, sampling_from_pb
from disagg.worker.bridge import run_request
from disagg.worker.validation import validate_prompt

log = logging.getLogger(__name__)


class DuplicateRequest(Exception):
    """The request id is already running or holds KV on this worker."""


@dataclasses.dataclass
class _Plan:
    mode: RequestMode
    prompt: list[int]
    sampling: SamplingParams
    first_token_id: int | None = None
    kv_transfer_ms: float = 0.0
    transfer_bytes: int = 0


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(
        self,
        engine: Engine,
        cfg: WorkerConfig,
        channel_for: Callable[[str], grpc.aio.Channel],
        store: MetaStore | None = None,
    ):
        self._engine = engine
        self._store = store
        self._cfg = cfg
        self._channel_for = channel_for
        self._tasks: set[asyncio.Task[None]] = set()
        self.transfers = {"ok": 0, "failed": 0, "bytes": 0}

    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:  # type: ignore[override]
        ids = list(request.prompt_token_ids)
        await validate_prompt(self._engine, ids, context)
        try:
            sampling = sampling_from_pb(request.sampling)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{e}")
            return
        rid = request.request_id
        if request.HasField("handle"):
            if request.handle.num_tokens != len(ids):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"handle.num_tokens: {request.handle.num_tokens} does not match the "
                    f"prompt's {len(ids)} tokens",
                )
                return
            try:
                plan = await self._take_handoff(rid, ids, sampling, request.handle)
            except DuplicateRequest as e:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {e}")
                return
        else:
            plan = _Plan(RequestMode.GENERATE, ids, sampling)
        if plan.sampling.max_tokens <= 0:
            yield worker_pb2.DecodeResponse(
                finish_reason="length", kv_transfer_ms=plan.kv_transfer_ms
            )
            return
        first = True
        started = time.monotonic()
        async with contextlib.aclosing(
            run_request(
                self._engine, rid, plan.prompt, plan.sampling, plan.mode, plan.first_token_id
            )
        ) as stream:
            async for out in stream:
                resp = worker_pb2.DecodeResponse(token_ids=out.token_ids)
                if first:
                    resp.kv_transfer_ms = plan.kv_transfer_ms
                    resp.prefill_ms = out.prefill_ms or 0.0
                    resp.queue_ms = out.queue_ms or 0.0
                    first = False
                if out.finish is not None:
                    if out.finish is FinishReason.ERROR:
                        log.error("decode failed request_id=%s error=%s", rid, out.error)
                    resp.finish_reason = out.finish.value
                    resp.decode_ms = (time.monotonic() - started) * 1000
                yield resp

    async def _take_handoff(
        self, rid: str, ids: list[int], sampling: SamplingParams, handle: common_pb2.KvHandle
    ) -> _Plan:
        start = time.monotonic()
        ok, ours = False, True
        try:
            nbytes = await self._pull(rid, handle)
            ok = True
        except DuplicateRequest:
            ours = False  # the KV is the request's already running under this id
            raise
        except TransferError as e:
            log.warning("kv pull failed, prefilling locally request_id=%s error=%s", rid, e)
            self.transfers["failed"] += 1
        finally:
            if ours:
                self._release_remote(handle, consumed=ok)
        elapsed = (time.monotonic() - start) * 1000
        if ok:
            self.transfers["ok"] += 1
            self.transfers["bytes"] += nbytes
            return _Plan(RequestMode.DECODE, ids, sampling, handle.first_token_id, elapsed, nbytes)
        # Recompute: the first token was already streamed, so continue after it.
        rest = (
            dataclasses.replace(sampling, max_tokens=sampling.max_tokens - 1)
            if sampling.max_tokens > 1
            else None
        )
        if rest is None:
            return _Plan(
                RequestMode.GENERATE,
                ids,
                dataclasses.replace(sampling, max_tokens=1),
                kv_transfer_ms=elapsed,
            )
        return _Plan(
            RequestMode.GENERATE, [*ids, handle.first_token_id], rest, kv_transfer_ms=elapsed
        )

    async def _pull(self, rid: str, handle: common_pb2.KvHandle) -> int:
        layout = layout_from_pb(handle.layout)
        if layout != self._engine.info.layout:
            raise TransferError(
                f"KV layout {layout} differs from this worker's {self._engine.info.layout}"
            )
        try:
            blocks = self._engine.reserve_import(rid, handle.num_tokens)
        except ValueError as e:  # the id is running or holds KV here
            raise DuplicateRequest(str(e)) from e
        if blocks is None:
            raise TransferError("no free KV blocks for the import")
        if len(blocks) != len(handle.block_ids):
            self._engine.release(rid)
            raise TransferError(
                f"handle has {len(handle.block_ids)} blocks for {handle.num_tokens} tokens, expected {len(blocks)}"
            )
        tracker = ChunkTracker(layout, len(blocks))
        try:
            async with asyncio.timeout(self._cfg.transfer_timeout_s):
                stub = worker_pb2_grpc.PrefillWorkerStub(self._channel_for(handle.owner_address))
                call = stub.PullKv(
                    worker_pb2.PullKvRequest(
                        request_id=rid, max_chunk_bytes=self._cfg.max_chunk_bytes
                    )
                )
                async for chunk in call:
                    tracker.accept(
                        chunk.layer, chunk.first_block, chunk.num_blocks, len(chunk.k), len(chunk.v)
                    )
                    dst = blocks[chunk.first_block : chunk.first_block + chunk.num_blocks]
                    self._engine.write_kv(dst, chunk.layer, chunk.k, chunk.v)
            if not tracker.complete():
                raise TransferError("KV stream ended before every block arrived")
        except BaseException as e:
            self._engine.release(rid)
            if isinstance(e, grpc.aio.AioRpcError):
                raise TransferError(
                    f"PullKv from {handle.owner_address}: {e.code().name} {e.details()}"
                ) from e
            if isinstance(e, TimeoutError):
                raise TransferError(
                    f"PullKv from {handle.owner_address} exceeded {self._cfg.transfer_timeout_s}s"
                ) from e
            raise
        return tracker.bytes

    def _release_remote(self, handle: common_pb2.KvHandle, consumed: bool) -> None:
        """Tells the owner to free the blocks. An unreachable owner frees them by lease (or
        is dead and holds nothing), so its Redis handle is marked FAILED and removed here."""

        async def release() -> None:
            stub = worker_pb2_grpc.PrefillWorkerStub(self._channel_for(handle.owner_address))
            try:
                await stub.ReleaseKv(
                    worker_pb2.ReleaseKvRequest(request_id=handle.request_id, consumed=consumed),
                    timeout=5,
                )
            except grpc.aio.AioRpcError as e:
                log.warning("ReleaseKv to %s failed: %s", handle.owner_address, e.code().name)
                await self._drop_handle(handle.request_id)

        task = asyncio.get_running_loop().create_task(release())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drop_handle(self, request_id: str) -> None:
        if self._store is None:
            return
        try:
            await self._store.set_kv_state(request_id, common_pb2.KV_STATE_FAILED)
            await self._store.delete_kv_handle(request_id)
        except Exception as e:
            log.warning("could not drop KV handle %s: %s", request_id, e)

    def close(self) -> None:
        """Nothing held between requests: each Decode call frees its own blocks."""
