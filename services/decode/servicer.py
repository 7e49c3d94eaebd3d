"""gRPC DecodeWorker: take a handoff, import its KV, continue generation.

1. With a handle: it must be for this request (its request id is the call's)
   and its owner a registered prefill worker (``transfer.owners``), else the
   handle is refused without contacting anyone and the prompt is prefilled
   here (as after a failed pull). Then the receiver
   (``disagg.transfer.receiver``) reserves blocks,
   fetches the KV from the prefill worker within transfer_timeout_s -- a NIXL
   READ where both workers have NIXL (``kv_transport`` auto|nixl), gRPC chunks
   otherwise --, verifies it and has the owner release it (CONSUMED on success,
   FAILED otherwise).
2. Submit to the engine in DECODE mode: it continues after the first token.
   If the import failed, the prompt (+ first token) is prefilled here instead,
   so the client still gets a correct stream.
Without a handle the prompt is prefilled here (short prompts, fallbacks).
A PREFILLING handle (layer-wise) is taken while its prompt still runs on the
prefill worker; the first token is learnt at the end of the import, so the
stream starts with it (or, when the import failed before the owner was done,
the prompt is prefilled here and the engine samples it).
This file converts protobuf, plans the fallback and streams the engine's tokens:
``responses`` is one request's stream, for a Decode call or for one request of a
DecodeSession (``disagg.worker.session``: many requests over one stream).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc

from disagg.engine.api import Engine, FinishReason, RequestMode, SamplingParams
from disagg.metastore.store import MetaStore
from disagg.metrics.transfer import TransferMetrics
from disagg.runtime.config import WorkerConfig
from disagg.transfer.errors import DuplicateRequest
from disagg.transfer.grpc_transport import GrpcTransport
from disagg.transfer.handle import Handle, handle_from_pb
from disagg.transfer.nixl_transport import NixlTransport
from disagg.transfer.owners import RegisteredOwners, prefill_workers
from disagg.transfer.receiver import KvReceiver
from disagg.transfer.transport import FALLBACK, TransportChoice
from disagg.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from disagg.wire import sampling_from_pb
from disagg.worker.bridge import run_request
from disagg.worker.host import KvPlane
from disagg.worker.session import Kind, Sessions
from disagg.worker.validation import MAX_CACHE_SALT_BYTES, Aborter, validate_prompt

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Plan:
    mode: RequestMode
    prompt: list[int]
    sampling: SamplingParams
    first_token_id: int | None = None
    kv_transfer_ms: float = 0.0
    transfer_bytes: int = 0
    kv_transport: str = ""  # the handoff's transport; "fallback": it failed, prefilled here
    emit_first: int | None = None  # a PREFILLING handle's first token: the stream's first


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(
        self,
        engine: Engine,
        cfg: WorkerConfig,
        channel_for: Callable[[str], grpc.aio.Channel],
        store: MetaStore | None = None,
        kv: KvPlane | None = None,
    ):
        self._engine = engine
        kv = kv or KvPlane(None, TransferMetrics())
        grpc_transport = GrpcTransport(channel_for, cfg.max_chunk_bytes)
        nixl = NixlTransport(kv.agent, channel_for) if kv.agent is not None else None
        # No registry (a worker built alone, in tests): nothing to check owners against.
        self._owners = RegisteredOwners(prefill_workers(store)) if store is not None else None
        self._receiver = KvReceiver(
            engine,
            grpc_transport,
            store,
            cfg.transfer_timeout_s,
            choose=TransportChoice(cfg.kv_transport, grpc_transport, nixl),
            metrics=kv.metrics,
            check_owner=self._owners.check if self._owners is not None else None,
        )
        kind = Kind(
            name="decode",
            responses=self.responses,
            is_last=lambda resp: bool(resp.finish_reason),
            update=worker_pb2.DecodeSessionUpdate,
            message=worker_pb2.DecodeSessionResponse,
        )
        self._sessions = Sessions(kind, cfg.max_concurrent_rpcs)

    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:  # type: ignore[override]
        async for resp in self.responses(request, context):
            yield resp

    async def DecodeSession(
        self,
        request_iterator: AsyncIterator[worker_pb2.DecodeSessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await self._sessions.serve(request_iterator, context)

    def drain(self) -> None:
        """Starts on open sessions are refused from now on (UNAVAILABLE); each
        session ends once its requests have."""
        self._sessions.drain()

    async def responses(
        self, request: worker_pb2.DecodeRequest, context: Aborter
    ) -> AsyncGenerator[worker_pb2.DecodeResponse, None]:
        """One request's responses; errors end it through context.abort."""
        plan = await self._plan(request, context)
        if plan is None:
            return
        if plan.emit_first is not None:
            first = self._first_response(request.request_id, plan, request.sampling)
            yield first
            if first.finish_reason:
                return
        if plan.sampling.max_tokens <= 0:
            yield worker_pb2.DecodeResponse(
                finish_reason="length",
                kv_transfer_ms=plan.kv_transfer_ms,
                kv_transport=plan.kv_transport,
            )
            return
        async for resp in self._stream(request.request_id, plan, request.cache_salt):
            yield resp

    def _first_response(
        self, rid: str, plan: _Plan, requested: common_pb2.SamplingParams
    ) -> worker_pb2.DecodeResponse:
        """The prefill worker's first token, first; it may end the request (then the
        imported KV is freed here)."""
        assert plan.emit_first is not None
        resp = worker_pb2.DecodeResponse(
            token_ids=[plan.emit_first],
            kv_transfer_ms=plan.kv_transfer_ms,
            kv_transport=plan.kv_transport,
        )
        eos = plan.emit_first in self._engine.info.eos_token_ids and not requested.ignore_eos
        if eos or requested.max_tokens <= 1:
            resp.finish_reason = "stop" if eos else "length"
            if plan.mode is RequestMode.DECODE:
                self._engine.release(rid)
        return resp

    async def _plan(self, request: worker_pb2.DecodeRequest, context: Aborter) -> _Plan | None:
        """What the engine runs for this request; None after aborting the call."""
        ids = list(request.prompt_token_ids)
        await validate_prompt(self._engine, ids, context)
        if len(request.cache_salt) > MAX_CACHE_SALT_BYTES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"cache_salt: at most {MAX_CACHE_SALT_BYTES} bytes",
            )
            return None
        try:
            sampling = sampling_from_pb(request.sampling)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{e}")
            return None
        if not request.HasField("handle"):
            return _Plan(RequestMode.GENERATE, ids, sampling)
        if request.handle.num_tokens != len(ids):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"handle.num_tokens: {request.handle.num_tokens} does not match the "
                f"prompt's {len(ids)} tokens",
            )
            return None
        try:
            return await self._take_handoff(
                request.request_id, ids, sampling, handle_from_pb(request.handle)
            )
        except DuplicateRequest as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {e}")
            return None

    async def _take_handoff(
        self, rid: str, ids: list[int], sampling: SamplingParams, handle: Handle
    ) -> _Plan:
        first = None if handle.streaming else handle.first_token_id
        if handle.request_id != rid:  # another request's KV: neither read nor released
            log.warning(
                "kv handle refused request_id=%r: it is the handle of %r", rid, handle.request_id
            )
            return _local_prefill(ids, sampling, first, 0.0, handle.streaming)
        result = await self._receiver.receive(rid, handle)
        if result.ok and result.first_token_id is not None:
            return _Plan(
                RequestMode.DECODE,
                ids,
                sampling,
                result.first_token_id,
                result.elapsed_ms,
                result.bytes,
                result.transport,
                emit_first=result.first_token_id if handle.streaming else None,
            )
        log.warning("kv pull failed, prefilling locally request_id=%s error=%s", rid, result.reason)
        if handle.streaming:  # known only if the owner got as far as done
            first = result.first_token_id
        return _local_prefill(ids, sampling, first, result.elapsed_ms, handle.streaming)

    async def _stream(
        self, rid: str, plan: _Plan, cache_salt: bytes
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        first = True
        started = time.monotonic()
        async with contextlib.aclosing(
            run_request(
                self._engine,
                rid,
                plan.prompt,
                plan.sampling,
                plan.mode,
                plan.first_token_id,
                cache_salt,
            )
        ) as stream:
            async for out in stream:
                resp = worker_pb2.DecodeResponse(token_ids=out.token_ids)
                if first:
                    resp.kv_transfer_ms = plan.kv_transfer_ms
                    resp.kv_transport = plan.kv_transport
                    resp.prefill_ms = out.prefill_ms or 0.0
                    resp.queue_ms = out.queue_ms or 0.0
                    first = False
                if out.finish is not None:
                    if out.finish is FinishReason.ERROR:
                        log.error("decode failed request_id=%s error=%s", rid, out.error)
                    resp.finish_reason = out.finish.value
                    resp.decode_ms = (time.monotonic() - started) * 1000
                yield resp

    def close(self) -> None:
        """Nothing held between requests (each Decode call frees its own blocks) but
        a registry listing in flight, stopped here."""
        if self._owners is not None:
            self._owners.close()


def _local_prefill(
    ids: list[int],
    sampling: SamplingParams,
    first_token_id: int | None,
    elapsed_ms: float,
    streaming: bool = False,
) -> _Plan:
    """The fallback after a failed import: the first token was already streamed to
    the client (or, for a PREFILLING handle, is streamed first here), so prefill the
    prompt + that token here and continue after it. No first token (a PREFILLING
    handle whose owner never finished): the prompt alone, the engine samples it."""
    if first_token_id is None or (sampling.max_tokens <= 1 and not streaming):
        one = sampling if first_token_id is None else dataclasses.replace(sampling, max_tokens=1)
        return _Plan(
            RequestMode.GENERATE, ids, one, kv_transfer_ms=elapsed_ms, kv_transport=FALLBACK
        )
    rest = dataclasses.replace(sampling, max_tokens=max(0, sampling.max_tokens - 1))
    return _Plan(
        RequestMode.GENERATE,
        [*ids, first_token_id],
        rest,
        kv_transfer_ms=elapsed_ms,
        kv_transport=FALLBACK,
        emit_first=first_token_id if streaming else None,
    )
