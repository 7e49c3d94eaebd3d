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
PrefillSession carries many Prefills over one stream (``disagg.worker.session``):
each start runs as a Prefill call. A cancel frees the request's KV at once
(FAILED), whether its answer went out or not (the scheduler's release of KV no
decode worker took); so does the session's end for a request it cut off before
its answer went out.
Layer-wise: PrefillStream answers a PREFILLING handle first, then runs the
prompt with the engine reporting each layer of each chunk to the handle's
stream; WatchKv follows that stream for the one decode worker that took the
handle (``transfer.progress``), which reads blocks as they complete.
The lifecycle is ``disagg.transfer``'s; this file converts protobuf to and
from its values and maps its errors to gRPC status codes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc

from disagg.engine.api import (
    Engine,
    FinishReason,
    KvProgress,
    RequestMode,
    SamplingParams,
    TokenOutput,
)
from disagg.metastore.store import MetaStore
from disagg.runtime.config import WorkerConfig
from disagg.transfer import grpc_transport
from disagg.transfer.errors import (
    HandoffNotFound,
    HandoffTaken,
    TransferAborted,
    TransferError,
)
from disagg.transfer.handle import handle_to_pb, nixl_pool_to_pb
from disagg.transfer.nixl_transport import NixlAgent
from disagg.transfer.progress import progress_to_pb
from disagg.transfer.sender import KvSender
from disagg.transfer.state import HandoffState
from disagg.v1 import worker_pb2, worker_pb2_grpc
from disagg.wire import sampling_from_pb
from disagg.worker.bridge import run_request
from disagg.worker.session import Kind, Sessions
from disagg.worker.validation import MAX_CACHE_SALT_BYTES, Aborter, validate_prompt


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
        kind = Kind(
            name="prefill",
            responses=self._answer,
            is_last=lambda resp: True,
            update=worker_pb2.PrefillSessionUpdate,
            message=worker_pb2.PrefillSessionResponse,
            on_given_up=self._given_up,
        )
        self._sessions = Sessions(kind, cfg.max_concurrent_rpcs)

    @property
    def freed(self) -> dict[str, int]:
        """Handoffs freed here by outcome: "consumed", "failed", "expired"."""
        return {state.value: n for state, n in self._sender.freed.items()}

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        return await self._prefill(request, context)

    async def PrefillSession(
        self,
        request_iterator: AsyncIterator[worker_pb2.PrefillSessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await self._sessions.serve(request_iterator, context)

    async def _answer(
        self, request: worker_pb2.PrefillRequest, context: Aborter
    ) -> AsyncGenerator[worker_pb2.PrefillResponse, None]:
        """One request of a session: Prefill's answer, or its abort for this request."""
        yield await self._prefill(request, context)

    def _given_up(self, rid: str) -> None:
        """A session's request given up (cancelled, cut off): its KV, if held, is nobody's."""
        self._sender.release(rid, consumed=False)

    async def _prefill(
        self, request: worker_pb2.PrefillRequest, context: Aborter
    ) -> worker_pb2.PrefillResponse:
        rid, ids, sampling = await self._validated(request, context)
        out = await self._run(rid, ids, sampling, request.cache_salt)
        if out.finish is not FinishReason.PREFILLED:
            await context.abort(
                grpc.StatusCode.INTERNAL, f"prefill failed: {out.error or out.finish}"
            )
        return await self._hold(rid, out, context)

    async def PrefillStream(  # type: ignore[override]
        self, streamed: worker_pb2.PrefillStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.PrefillStreamResponse]:
        request = streamed.prefill
        rid, ids, sampling = await self._validated(request, context)
        try:
            stream = self._sender.open_stream(rid)
        except TransferError as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {e}")
            raise AssertionError from e  # unreachable: abort raises
        handle = self._sender.stream_handle(rid, len(ids))
        out: TokenOutput | None = None
        try:
            first = worker_pb2.PrefillResponse(handle=handle_to_pb(handle, HandoffState.PREFILLING))
            yield worker_pb2.PrefillStreamResponse(prefill=first)
            out = await self._run(rid, ids, sampling, request.cache_salt, stream.on_kv_progress)
        finally:
            if out is None or out.finish is not FinishReason.PREFILLED:
                why = "cancelled" if out is None else str(out.error or out.finish)
                self._sender.fail_stream(rid, why)
        if out.finish is not FinishReason.PREFILLED:
            await context.abort(
                grpc.StatusCode.INTERNAL, f"prefill failed: {out.error or out.finish}"
            )
        yield worker_pb2.PrefillStreamResponse(prefill=await self._hold(rid, out, context))

    async def WatchKv(  # type: ignore[override]
        self, request: worker_pb2.WatchKvRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.KvProgress]:
        rid = request.request_id
        if request.nixl and self._nixl is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no NIXL agent here")
        try:
            stream = self._sender.watch(rid, request.nixl)
        except HandoffTaken as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
            raise AssertionError from e  # unreachable: abort raises
        except HandoffNotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            raise AssertionError from e
        first = True
        try:
            async for p in stream.follow():
                msg = progress_to_pb(p)
                if first and request.nixl and self._nixl is not None:
                    msg.agent_name = self._nixl.name
                    if request.include_agent_metadata:
                        msg.agent_metadata = self._nixl.metadata
                        msg.pool.CopyFrom(nixl_pool_to_pb(self._nixl.pool))
                first = False
                yield msg
        except TransferAborted as e:
            await context.abort(grpc.StatusCode.ABORTED, str(e))
        finally:
            self._sender.unwatch(rid, stream)

    async def _validated(
        self, request: worker_pb2.PrefillRequest, context: Aborter
    ) -> tuple[str, list[int], SamplingParams]:
        """(request id, prompt, sampling) of a well-formed Prefill; else the call is aborted."""
        rid = request.request_id
        ids = list(request.prompt_token_ids)
        await validate_prompt(self._engine, ids, context)
        try:
            sampling = sampling_from_pb(request.sampling)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{e}")
            raise AssertionError from e  # unreachable: abort raises
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
        return rid, ids, sampling

    async def _run(
        self,
        rid: str,
        ids: list[int],
        sampling: SamplingParams,
        cache_salt: bytes,
        on_kv_progress: Callable[[KvProgress], None] | None = None,
    ) -> TokenOutput:
        """The prompt through the engine (PREFILL_ONLY): its one output, or its error."""
        async with contextlib.aclosing(
            run_request(
                self._engine,
                rid,
                ids,
                sampling,
                RequestMode.PREFILL_ONLY,
                cache_salt=cache_salt,
                on_kv_progress=on_kv_progress,
            )
        ) as stream:
            outs = [o async for o in stream]  # one output: the first token (or an error)
        return outs[-1]

    async def _hold(
        self, rid: str, out: TokenOutput, context: Aborter
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

    def drain(self) -> None:
        """Starts on open sessions are refused from now on (UNAVAILABLE); each
        session ends once its requests are answered. Calls need nothing: each is
        one request, and the server's grace period lets them finish."""
        self._sessions.drain()

    def close(self) -> None:
        self._sender.close()
