"""One request's way through the cluster.

1. Admit (in-flight cap) and route (disagg.policy) from the registry snapshot.
2. Prefill on a prefill worker: first token + KV handle (READY in Redis).
   The first token is streamed to the client at once (TTFT).
3. Hand off to a decode worker: it pulls the KV and streams the rest.
   No prefill worker, or a prefill worker that is unreachable: the decode
   worker prefills the prompt itself.
4. Relay: incremental detokenization, stop strings, usage and timings.
Cancellation at any point (client gone, stop string) cancels the worker
calls; a handle not yet handed to a decode worker is released here, so its
blocks do not wait for the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from disagg.metrics.scheduler import SchedulerMetrics
from disagg.policy.routing import NoWorker, Route, WorkerView, route
from disagg.tokenization.detokenizer import IncrementalDetokenizer, StopStringMatcher
from disagg.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from disagg.wire import sampling_to_pb
from services.scheduler.registry import WorkerRegistry
from services.scheduler.requests import (
    GenerationEvent,
    GenerationRequest,
    InvalidRequest,
    Overloaded,
    Timing,
    Unavailable,
)

log = logging.getLogger(__name__)


def _ms(since: float) -> float:
    return (time.monotonic() - since) * 1000


@dataclass
class _Relay:
    """Turns worker tokens into client events (text, stop strings, counts)."""

    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    eos: frozenset[int]
    ignore_eos: bool
    completion_tokens: int = 0
    finish: str | None = None
    events: list[GenerationEvent] = field(default_factory=list)

    def push(self, token_ids: list[int]) -> GenerationEvent:
        self.completion_tokens += len(token_ids)
        visible = [t for t in token_ids if self.ignore_eos or t not in self.eos]
        text = self.stops.feed(self.detok.add(visible)) if visible else ""
        if self.stops.stopped or len(visible) < len(token_ids):
            self.finish = "stop"
        return GenerationEvent(token_ids=list(token_ids), text=text)

    def tail(self) -> str:
        return self.stops.flush()


class Orchestrator:
    def __init__(
        self,
        registry: WorkerRegistry,
        tokenizer: object,
        eos_token_ids: tuple[int, ...],
        channel_for: Callable[[str], grpc.aio.Channel],
        max_inflight: int,
        worker_timeout_s: float,
        metrics: SchedulerMetrics | None = None,
    ):
        self._registry = registry
        self._metrics = metrics or SchedulerMetrics()  # observation only: never changes a decision
        self._tok = tokenizer
        self._eos = frozenset(eos_token_ids)
        self._channel_for = channel_for
        self._max_inflight = max_inflight
        self._worker_timeout_s = worker_timeout_s
        self.inflight = 0

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Yields events; raises Unavailable / Overloaded / InvalidRequest before the first one."""
        arrival = time.monotonic()
        with self._metrics.trace(arrival) as trace:
            if self.inflight >= self._max_inflight:
                raise Overloaded(
                    f"{self.inflight} requests in flight (limit {self._max_inflight})",
                    retry_after_s=1.0,
                )
            rid = req.request_id
            plan = self._route(req)
            self.inflight += 1
            try:
                async for ev in self._run(rid, req, plan, arrival):
                    trace.event(ev)
                    yield ev
            finally:
                self.inflight -= 1

    def _route(self, req: GenerationRequest) -> Route:
        workers: list[WorkerView] = self._registry.snapshot()
        try:
            plan = route(
                workers,
                len(req.prompt_token_ids),
                req.sampling.max_tokens,
                req.prefill_pin,
                req.decode_pin,
            )
        except NoWorker as e:
            raise Unavailable(str(e)) from e
        log.info(
            "route prompt_tokens=%d max_tokens=%d prefill=%s decode=%s reason=%s",
            len(req.prompt_token_ids),
            req.sampling.max_tokens,
            plan.prefill.worker_id if plan.prefill else "-",
            plan.decode.worker_id,
            plan.reason,
        )
        return plan

    async def _run(
        self, rid: str, req: GenerationRequest, plan: Route, arrival: float
    ) -> AsyncIterator[GenerationEvent]:
        relay = _Relay(
            IncrementalDetokenizer(self._tok, req.prompt_token_ids),
            StopStringMatcher(req.stop),
            self._eos,
            req.sampling.ignore_eos,
        )
        timing = Timing()
        cached = 0
        handle: common_pb2.KvHandle | None = None
        prefill_id = ""
        if plan.prefill is not None:
            pre = await self._prefill(rid, req, plan.prefill, timing)
            if pre is not None:
                handle, cached, prefill_id = pre.handle, pre.cached_tokens, plan.prefill.worker_id
                timing.ttft_ms = _ms(arrival)
                yield relay.push([handle.first_token_id])
        try:
            if handle is not None and self._done_after_first(relay, req):
                await self._release(handle)
                handle = None
            else:
                async for ev in self._decode(rid, req, plan.decode, handle, relay, timing, arrival):
                    if handle is not None:
                        self._metrics.kv_handed_off(handle)
                    handle = None  # the decode worker owns the handoff now
                    yield ev
        finally:
            if handle is not None:  # cancelled before the decode worker took the handoff
                await asyncio.shield(self._release(handle))
        timing.e2e_ms = _ms(arrival)
        last = GenerationEvent(
            token_ids=[],
            text=relay.tail(),
            finish_reason=relay.finish or "length",
            prompt_tokens=len(req.prompt_token_ids),
            completion_tokens=relay.completion_tokens,
            cached_tokens=cached,
            timing=timing,
            prefill_worker=prefill_id or plan.decode.worker_id,
            decode_worker=plan.decode.worker_id,
        )
        yield last

    def _done_after_first(self, relay: _Relay, req: GenerationRequest) -> bool:
        if relay.finish:
            return True
        first = relay.completion_tokens  # 1
        if req.sampling.max_tokens <= first:
            relay.finish = "length"
            return True
        return False

    async def _prefill(
        self, rid: str, req: GenerationRequest, worker: WorkerView, timing: Timing
    ) -> worker_pb2.PrefillResponse | None:
        """The prefill response, or None when the worker is unreachable (prefill on decode instead)."""
        stub = worker_pb2_grpc.PrefillWorkerStub(self._channel_for(worker.address))
        msg = worker_pb2.PrefillRequest(
            request_id=rid,
            prompt_token_ids=req.prompt_token_ids,
            sampling=sampling_to_pb(req.sampling),
        )
        with self._registry.track(worker.worker_id):
            try:
                resp: worker_pb2.PrefillResponse = await stub.Prefill(
                    msg, timeout=self._worker_timeout_s
                )
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidRequest(
                        "prompt", e.details() or "rejected by the prefill worker"
                    ) from e
                if req.prefill_pin:
                    raise Unavailable(
                        f"prefill_worker {req.prefill_pin!r}: {e.code().name} {e.details()}"
                    ) from e
                log.warning(
                    "prefill on %s failed (%s); prefilling on the decode worker",
                    worker.worker_id,
                    e.code().name,
                )
                return None
        timing.queue_ms += resp.queue_ms
        timing.prefill_ms = resp.prefill_ms
        return resp

    async def _decode(
        self,
        rid: str,
        req: GenerationRequest,
        worker: WorkerView,
        handle: common_pb2.KvHandle | None,
        relay: _Relay,
        timing: Timing,
        arrival: float,
    ) -> AsyncIterator[GenerationEvent]:
        stub = worker_pb2_grpc.DecodeWorkerStub(self._channel_for(worker.address))
        msg = worker_pb2.DecodeRequest(
            request_id=rid,
            prompt_token_ids=req.prompt_token_ids,
            sampling=sampling_to_pb(req.sampling),
            handle=handle,
        )
        with self._registry.track(worker.worker_id):
            call = stub.Decode(msg)
            try:
                async for resp in call:
                    yield self._on_decode(resp, relay, timing, arrival, local=handle is None)
                    if relay.finish:
                        return
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidRequest(
                        "prompt", e.details() or "rejected by the decode worker"
                    ) from e
                raise Unavailable(
                    f"decode worker {worker.worker_id}: {e.code().name} {e.details()}"
                ) from e
            finally:
                call.cancel()

    def _on_decode(
        self,
        resp: worker_pb2.DecodeResponse,
        relay: _Relay,
        timing: Timing,
        arrival: float,
        local: bool,
    ) -> GenerationEvent:
        if resp.kv_transfer_ms:
            timing.kv_transfer_ms = resp.kv_transfer_ms
        if local and resp.prefill_ms:
            timing.prefill_ms, timing.queue_ms = resp.prefill_ms, timing.queue_ms + resp.queue_ms
        if resp.token_ids and not timing.ttft_ms:
            timing.ttft_ms = _ms(arrival)
        ev = relay.push(list(resp.token_ids))
        if resp.finish_reason:
            timing.decode_ms = resp.decode_ms
            if not relay.finish:
                relay.finish = "error" if resp.finish_reason == "error" else resp.finish_reason
        return ev

    async def _release(self, handle: common_pb2.KvHandle) -> None:
        stub = worker_pb2_grpc.PrefillWorkerStub(self._channel_for(handle.owner_address))
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.ReleaseKv(
                worker_pb2.ReleaseKvRequest(request_id=handle.request_id, consumed=False), timeout=5
            )
