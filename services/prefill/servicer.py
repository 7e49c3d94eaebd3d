"""gRPC PrefillWorker: Prefill -> (PullKv) -> ReleaseKv, over the handoff's sender.

1. Prefill: the engine runs the prompt (PREFILL_ONLY), samples the first
   token and holds the blocks; the sender leases them and publishes the
   handle to Redis as READY in the background: the answer never waits on
   Redis (the handle travels in it).
2. PullKv: one decode worker streams the blocks (READY -> TRANSFERRING); or
   StartKvRead: one decode worker READs them over NIXL itself (READY ->
   TRANSFERRING; the agent's metadata when asked for).
3. ReleaseKv: CONSUMED after a completed pull, FAILED on cancel; blocks freed.
   Its answer tells a NIXL reader whether the blocks were held until then.
   A lease that runs out first frees them as EXPIRED.
The lifecycle is ``disagg.transfer``'s; this file converts protobuf to and
from its values and maps its errors to gRPC status codes.
"""

from __future__ import annotations

import contextlib

import grpc

from disagg.engine.api import Engine, FinishReason, RequestMode, TokenOutput
from disagg.metastore.store import MetaStore
from disagg.runtime.config import WorkerConfig
from disagg.transfer import grpc_transport
from disagg.transfer.errors import HandoffNotFound, TransferAborted, TransferError
from disagg.transfer.handle import handle_to_pb, nixl_pool_to_pb
from disagg.transfer.nixl_transport import NixlAgent
from disagg.transfer.sender import KvSender
from disagg.transfer.state import HandoffState
from disagg.v1 import worker_pb2, worker_pb2_grpc
from disagg.wire import sampling_from_pb
from disagg.worker.bridge import run_request
from disagg.worker.validation import MAX_CACHE_SALT_BYTES, validate_prompt


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(
        self,
        engine: Engine,
        store: MetaStore,
        cfg: WorkerConfig,
        worker_id: str,
        address: str,
        nixl: NixlAgent | None = None,
    ):
        self._engine = engine
        self._nixl = nixl
        self._sender = KvSender(
            engine,
            store,
            worker_id=worker_id,
            address=address,
            lease_s=cfg.kv_lease_s,
            max_chunk_bytes=cfg.max_chunk_bytes,
            nixl=nixl.pool if nixl is not None else None,
        )

    @property
    def freed(self) -> dict[str, int]:
        """Handoffs freed here by outcome: "consumed", "failed", "expired"."""
        return {state.value: n for state, n in self._sender.freed.items()}

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
        if len(request.cache_salt) > MAX_CACHE_SALT_BYTES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"cache_salt: at most {MAX_CACHE_SALT_BYTES} bytes",
            )
        if self._sender.holds(rid):
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"request_id: {rid!r} already holds KV here; release it or use a new id",
            )
        async with contextlib.aclosing(
            run_request(
                self._engine,
                rid,
                ids,
                sampling,
                RequestMode.PREFILL_ONLY,
                cache_salt=request.cache_salt,
            )
        ) as stream:
            outs = [o async for o in stream]  # one output: the first token (or an error)
        out = outs[-1]
        if out.finish is not FinishReason.PREFILLED:
            await context.abort(
                grpc.StatusCode.INTERNAL, f"prefill failed: {out.error or out.finish}"
            )
        return await self._hold(rid, out, context)

    async def _hold(
        self, rid: str, out: TokenOutput, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        try:
            handle = await self._sender.hold(rid, out.token_ids[0])
        except TransferError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
            raise AssertionError from e  # unreachable: abort raises
        return worker_pb2.PrefillResponse(
            handle=handle_to_pb(handle, HandoffState.READY),
            queue_ms=out.queue_ms or 0.0,
            prefill_ms=out.prefill_ms or 0.0,
            cached_tokens=out.cached_tokens,
        )

    async def PullKv(self, request: worker_pb2.PullKvRequest, context: grpc.aio.ServicerContext):  # type: ignore[override]
        chunks = grpc_transport.serve(self._sender, request.request_id, request.max_chunk_bytes)
        try:
            async for chunk in chunks:
                yield chunk
        except HandoffNotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except TransferAborted as e:
            await context.abort(grpc.StatusCode.ABORTED, str(e))

    async def StartKvRead(
        self, request: worker_pb2.StartKvReadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.StartKvReadResponse:
        if self._nixl is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no NIXL agent here")
            raise AssertionError  # unreachable: abort raises
        try:
            self._sender.begin(request.request_id)
        except HandoffNotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        resp = worker_pb2.StartKvReadResponse(agent_name=self._nixl.name)
        if request.include_agent_metadata:
            resp.agent_metadata = self._nixl.metadata
            resp.pool.CopyFrom(nixl_pool_to_pb(self._nixl.pool))
        return resp

    async def ReleaseKv(
        self, request: worker_pb2.ReleaseKvRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReleaseKvResponse:
        released = self._sender.release(request.request_id, request.consumed)
        return worker_pb2.ReleaseKvResponse(released=released)

    async def settle(self) -> None:
        """Waits for the Redis writes issued so far (tests, shutdown): never on a request."""
        await self._sender.settle()

    def close(self) -> None:
        self._sender.close()
