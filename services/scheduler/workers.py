"""The scheduler's client of the workers: protobuf on the wire, dataclasses inside.

The orchestrator calls workers only through ``WorkerClient``; every protobuf
message and every gRPC status the scheduler sees is built or read here.

1. ``prefill(worker, request)``: the prompt prefilled on a prefill worker ->
   ``PrefillResult`` (first token, timings, and an opaque ``KvTicket`` for the
   KV it now holds). A prompt the worker rejects raises ``InvalidRequest``;
   any other failure raises ``PrefillUnreachable`` (the caller may prefill
   elsewhere).
   ``prefill_stream(worker, request)`` (layer-wise): a ``KvTicket`` for the KV
   at once -- a decode worker can take it before the prompt has run -- then
   the ``PrefillResult``; the same errors, raised instead of either.
2. ``decode(worker, request, ticket)``: a stream of ``DecodeUpdate``. With a
   ticket the decode worker pulls that KV and continues from its first token;
   without one it prefills ``request``'s prompt itself. A rejected prompt
   raises ``InvalidRequest``; a broken stream raises ``DecodeLost``. Closing
   the iterator cancels the call.
3. ``release(ticket)``: frees KV no decode worker took. Best effort: it does
   not raise on a worker error (the prefill worker's lease frees it anyway).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import grpc

from disagg.metrics.scheduler import kv_bytes
from disagg.policy.routing import WorkerView
from disagg.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from disagg.wire import sampling_to_pb
from services.scheduler.requests import GenerationRequest, InvalidRequest

_RELEASE_TIMEOUT_S = 5.0


class PrefillUnreachable(RuntimeError):
    """The prefill worker failed the call (unreachable, deadline, draining, error)."""

    def __init__(self, code: str, details: str | None):
        super().__init__(f"{code} {details}")
        self.code = code  # the gRPC status name


class DecodeLost(RuntimeError):
    """The decode worker's stream broke (worker died, drained, unreachable)."""


@dataclass(frozen=True)
class KvTicket:
    """Prefilled KV held by a prefill worker: opaque to everyone but this module."""

    _handle: common_pb2.KvHandle

    @property
    def streamed(self) -> bool:
        """Taken while its prompt still runs (layer-wise): no first token in it."""
        return self._handle.state == common_pb2.KV_STATE_PREFILLING

    @property
    def nbytes(self) -> int:
        """Bytes of K and V the decode worker pulls for it."""
        lay, h = self._handle.layout, self._handle
        blocks = -(-h.num_tokens // max(1, lay.block_size)) if self.streamed else len(h.block_ids)
        return kv_bytes(
            blocks,
            lay.num_layers,
            lay.block_size,
            lay.num_kv_heads,
            lay.head_dim,
            lay.dtype,
        )


@dataclass(frozen=True)
class PrefillResult:
    handle: KvTicket
    first_token_id: int  # sampled by the prefill worker
    cached_tokens: int  # prompt tokens the worker's prefix cache served
    queue_ms: float
    prefill_ms: float


@dataclass(frozen=True)
class DecodeUpdate:
    """One message of a decode stream."""

    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # on the last update: stop | length | error
    kv_transfer_ms: float = 0.0  # on the first update, after a pull
    prefill_ms: float = 0.0  # on the first update, when prefilled on the decode worker
    queue_ms: float = 0.0  # on the first update
    decode_ms: float = 0.0  # on the last update
    kv_transport: str = ""  # on the first update after a handoff: nixl | grpc | fallback


def prefill_request(req: GenerationRequest) -> worker_pb2.PrefillRequest:
    return worker_pb2.PrefillRequest(
        request_id=req.request_id,
        prompt_token_ids=req.prompt_token_ids,
        sampling=sampling_to_pb(req.sampling),
        cache_salt=req.cache_salt,
    )


def prefill_result(resp: worker_pb2.PrefillResponse) -> PrefillResult:
    return PrefillResult(
        handle=KvTicket(resp.handle),
        first_token_id=resp.handle.first_token_id,
        cached_tokens=resp.cached_tokens,
        queue_ms=resp.queue_ms,
        prefill_ms=resp.prefill_ms,
    )


def decode_request(req: GenerationRequest, ticket: KvTicket | None) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(
        request_id=req.request_id,
        prompt_token_ids=req.prompt_token_ids,
        sampling=sampling_to_pb(req.sampling),
        handle=None if ticket is None else ticket._handle,
        cache_salt=req.cache_salt,
    )


def decode_update(resp: worker_pb2.DecodeResponse) -> DecodeUpdate:
    return DecodeUpdate(
        token_ids=tuple(resp.token_ids),
        finish_reason=resp.finish_reason or None,
        kv_transfer_ms=resp.kv_transfer_ms,
        prefill_ms=resp.prefill_ms,
        queue_ms=resp.queue_ms,
        decode_ms=resp.decode_ms,
        kv_transport=resp.kv_transport,
    )


def release_request(ticket: KvTicket) -> worker_pb2.ReleaseKvRequest:
    return worker_pb2.ReleaseKvRequest(request_id=ticket._handle.request_id, consumed=False)


def _rejected(e: grpc.aio.AioRpcError) -> bool:
    return e.code() == grpc.StatusCode.INVALID_ARGUMENT  # the prompt, not the worker


def _invalid(e: grpc.aio.AioRpcError, by: str) -> InvalidRequest:
    return InvalidRequest("prompt", e.details() or f"rejected by the {by} worker")


class WorkerClient:
    def __init__(self, channel_for: Callable[[str], grpc.aio.Channel], timeout_s: float):
        self._channel_for = channel_for  # one reused channel per address
        self._timeout_s = timeout_s  # deadline of a prefill call

    async def prefill(self, worker: WorkerView, req: GenerationRequest) -> PrefillResult:
        stub = worker_pb2_grpc.PrefillWorkerStub(self._channel_for(worker.address))
        try:
            resp = await stub.Prefill(prefill_request(req), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as e:
            if _rejected(e):
                raise _invalid(e, "prefill") from e
            raise PrefillUnreachable(e.code().name, e.details()) from e
        return prefill_result(resp)

    async def prefill_stream(
        self, worker: WorkerView, req: GenerationRequest
    ) -> AsyncGenerator[KvTicket | PrefillResult, None]:
        stub = worker_pb2_grpc.PrefillWorkerStub(self._channel_for(worker.address))
        request = worker_pb2.PrefillStreamRequest(prefill=prefill_request(req))
        call = stub.PrefillStream(request, timeout=self._timeout_s)
        try:
            first = True
            async for resp in call:
                yield KvTicket(resp.prefill.handle) if first else prefill_result(resp.prefill)
                first = False
        except grpc.aio.AioRpcError as e:
            if _rejected(e):
                raise _invalid(e, "prefill") from e
            raise PrefillUnreachable(e.code().name, e.details()) from e
        finally:
            call.cancel()

    async def decode(
        self, worker: WorkerView, req: GenerationRequest, ticket: KvTicket | None
    ) -> AsyncGenerator[DecodeUpdate, None]:
        stub = worker_pb2_grpc.DecodeWorkerStub(self._channel_for(worker.address))
        call = stub.Decode(decode_request(req, ticket))
        try:
            async for resp in call:
                yield decode_update(resp)
        except grpc.aio.AioRpcError as e:
            if _rejected(e):
                raise _invalid(e, "decode") from e
            raise DecodeLost(f"{worker.worker_id}: {e.code().name} {e.details()}") from e
        finally:
            call.cancel()

    async def release(self, ticket: KvTicket) -> None:
        stub = worker_pb2_grpc.PrefillWorkerStub(self._channel_for(ticket._handle.owner_address))
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.ReleaseKv(release_request(ticket), timeout=_RELEASE_TIMEOUT_S)
