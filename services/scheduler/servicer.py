"""gRPC Scheduler: protobuf in and out; everything else is the orchestrator's.

The client's ``request_id`` is only echoed: the request runs under the
internal id ``build`` gives it, and a client cancels it by cancelling its own
call (the stream owns the request), never by naming an id.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc

from disagg.tokenization.prompts import ChatTurn
from disagg.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.auth import cache_salt, grpc_authorization, grpc_metadata_ok
from services.scheduler.limits import build_off_loop
from services.scheduler.orchestrator import Orchestrator
from services.scheduler.registry import WorkerRegistry
from services.scheduler.requests import (
    GenerationEvent,
    InvalidRequest,
    Overloaded,
    RawRequest,
    RequestFactory,
    Unavailable,
)


def raw_from_pb(req: scheduler_pb2.GenerateRequest) -> RawRequest:
    def opt(name: str) -> Any:
        return getattr(req, name) if req.HasField(name) else None

    return RawRequest(
        request_id=req.request_id,
        prompt=req.prompt,
        messages=[ChatTurn(m.role, m.content) for m in req.messages],
        prompt_token_ids=list(req.prompt_token_ids),
        max_tokens=opt("max_tokens"),
        temperature=opt("temperature"),
        top_p=opt("top_p"),
        top_k=opt("top_k"),
        seed=opt("seed"),
        stop=list(req.stop),
        ignore_eos=req.ignore_eos,
        prefill_pin=req.prefill_worker,
        decode_pin=req.decode_worker,
        ttft_slo_ms=opt("ttft_slo_ms"),
        itl_slo_ms=opt("itl_slo_ms"),
        verify=req.verify,
    )


def event_to_pb(rid: str, ev: GenerationEvent) -> scheduler_pb2.GenerateResponse:
    resp = scheduler_pb2.GenerateResponse(request_id=rid, token_ids=ev.token_ids, text=ev.text)
    if ev.finish_reason is not None:
        t = ev.timing
        resp.finish_reason = ev.finish_reason
        resp.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=ev.prompt_tokens,
                completion_tokens=ev.completion_tokens,
                cached_prompt_tokens=ev.cached_tokens,
            )
        )
        resp.timings.CopyFrom(
            common_pb2.Timings(
                queue_ms=t.queue_ms,
                prefill_ms=t.prefill_ms,
                kv_transfer_ms=t.kv_transfer_ms,
                decode_ms=t.decode_ms,
                ttft_ms=t.ttft_ms,
                e2e_ms=t.e2e_ms,
                kv_transport=t.kv_transport,
            )
        )
        resp.prefill_worker, resp.decode_worker = ev.prefill_worker, ev.decode_worker
    return resp


RETRY_AFTER = "retry-after"  # metadata key of the retry hint (seconds, decimal)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self,
        orchestrator: Orchestrator,
        registry: WorkerRegistry,
        requests: RequestFactory,
        api_key: str = "",
    ):
        self._orch = orchestrator
        self._api_key = api_key
        self._registry = registry
        self._requests = requests

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not grpc_metadata_ok(context.invocation_metadata(), self._api_key):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong API key (metadata 'authorization: Bearer <key>')",
            )

    async def Generate(
        self, request: scheduler_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.GenerateResponse]:  # type: ignore[override]
        await self._authorize(context)
        try:
            req = await build_off_loop(self._requests, raw_from_pb(request))
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        salt = cache_salt(self._api_key, grpc_authorization(context.invocation_metadata()))
        if salt:
            req = dataclasses.replace(req, cache_salt=salt)
        code, message = None, ""
        trailing: tuple[tuple[str, str], ...] = ()
        try:
            async with contextlib.aclosing(self._orch.generate(req)) as events:
                async for ev in events:
                    yield event_to_pb(req.reply_id, ev)  # the client's id, never the internal one
        except InvalidRequest as e:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except Overloaded as e:
            # The hint, in seconds, three ways: initial metadata (older clients read it),
            # trailing metadata (what disagg.client reads first) and the message.
            hint = ((RETRY_AFTER, f"{e.retry_after_s:g}"),)
            await context.send_initial_metadata(hint)
            trailing = hint
            code, message = (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{e}; retry after {e.retry_after_s:g}s",
            )
        except Unavailable as e:
            code, message = grpc.StatusCode.UNAVAILABLE, str(e)
        if code is not None:
            await context.abort(code, message, trailing_metadata=trailing)

    async def ListWorkers(
        self, request: scheduler_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListWorkersResponse:
        await self._authorize(context)
        await self._registry.refresh()
        return scheduler_pb2.ListWorkersResponse(workers=self._registry.infos())
