"""One request's way through the cluster.

1. Admit (in-flight cap), then decide (disagg.policy, a pure function of the
   registry snapshot): route, or reject when the predicted TTFT/ITL breaks the
   request's SLO. Every decision goes to the decision log with its inputs.
2. Prefill on a prefill worker, in the scheduler's dispatch queue for that
   worker (shortest expected first, with aging): first token + KV handle
   (READY in Redis). The first token is streamed to the client at once (TTFT).
   The observed prefill time refines the worker's cost model; the prompt's
   blocks go to the prefix index under that worker.
3. Hand off to a decode worker: it pulls the KV and streams the rest.
   Routed local (short prompt, long prefill queues), no prefill worker, or a
   prefill worker that is unreachable: the decode worker prefills the prompt itself.
4. Relay: incremental detokenization, stop strings, usage and timings.
Cancellation at any point (client gone, stop string) cancels the worker
calls; a handle not yet handed to a decode worker is released here, so its
blocks do not wait for the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from disagg.kvpool.hashing import prompt_hashes
from disagg.metrics.scheduler import SchedulerMetrics, Slo
from disagg.policy.cost import CostModel
from disagg.policy.queue import QueueOrder
from disagg.policy.routing import (
    Decision,
    NoWorker,
    PolicyConfig,
    RouteRequest,
    WorkerView,
    decide,
)
from disagg.runtime.config import SchedulerConfig
from disagg.tokenization.detokenizer import IncrementalDetokenizer, StopStringMatcher
from disagg.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from disagg.wire import sampling_to_pb
from services.scheduler.decisions import DecisionLog
from services.scheduler.dispatch import PrefillDispatch
from services.scheduler.registry import Reservation, WorkerRegistry
from services.scheduler.requests import (
    GenerationEvent,
    GenerationRequest,
    InvalidRequest,
    Overloaded,
    Timing,
    Unavailable,
)

log = logging.getLogger(__name__)


_MAX_MIGRATIONS = 2  # decode workers a request may lose before it fails


class _DecodeLost(RuntimeError):
    """The decode worker's stream broke (worker died, drained, unreachable)."""


def _ms(since: float) -> float:
    return (time.monotonic() - since) * 1000


@dataclass
class _Relay:
    """Turns worker tokens into client events (text, stop strings, counts)."""

    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    eos: frozenset[int]
    ignore_eos: bool
    generated: list[int] = field(default_factory=list)  # every token sent to the client
    finish: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)

    def push(self, token_ids: list[int]) -> GenerationEvent:
        self.generated.extend(token_ids)
        visible = [t for t in token_ids if self.ignore_eos or t not in self.eos]
        text = self.stops.feed(self.detok.add(visible)) if visible else ""
        if self.stops.stopped or len(visible) < len(token_ids):
            self.finish = "stop"
        return GenerationEvent(token_ids=list(token_ids), text=text)

    def tail(self) -> str:
        return self.stops.flush()


@dataclass(frozen=True)
class Admission:
    """The scheduler's routing and admission settings (from SchedulerConfig)."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    slo_ttft_ms: float = 0.0  # default TTFT SLO; 0 = none (no TTFT admission)
    slo_itl_ms: float = 0.0  # default ITL SLO; 0 = none
    queue: QueueOrder = field(default_factory=QueueOrder)
    dispatch_depth: int = 2  # prefills in flight per prefill worker; more wait in our queue
    decision_log: str = ""  # JSONL path of the replayable decision log; "" = log lines only


def admission_of(cfg: SchedulerConfig) -> Admission:
    return Admission(
        policy=PolicyConfig(
            policy=cfg.policy,
            local_prefill_tokens=cfg.local_prefill_tokens,
            local_prefill_queue_ms=cfg.local_prefill_queue_ms,
            prefill_prior=CostModel(cfg.prefill_base_ms, cfg.prefill_ms_per_token),
        ),
        slo_ttft_ms=cfg.slo_ttft_ms,
        slo_itl_ms=cfg.slo_itl_ms,
        queue=QueueOrder(max_wait_ms=cfg.queue_max_wait_ms),
        dispatch_depth=cfg.prefill_dispatch_depth,
        decision_log=cfg.decision_log,
    )


def slo_of(cfg: SchedulerConfig) -> Slo:
    """The SLO ``slo_met_total`` counts against: the configured one, else the metrics' default."""
    default = Slo()
    return Slo(cfg.slo_ttft_ms or default.ttft_ms, cfg.slo_itl_ms or default.tpot_ms)


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
        admission: Admission | None = None,
    ):
        self._registry = registry
        self.admission = admission or Admission()
        self.decisions = DecisionLog(self.admission.policy, self.admission.decision_log)
        registry.on_cost = self.decisions.cost
        for worker_id, model in registry.costs.items():  # seeded before the hook existed
            self.decisions.cost(worker_id, model)
        self._dispatch = PrefillDispatch(self.admission.queue, self.admission.dispatch_depth)
        self._seq = itertools.count()
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
            plan, hashes = self.route(req)
            if plan.rejected:
                raise Overloaded(plan.rejected, retry_after_s=plan.retry_after_s)
            n = len(req.prompt_token_ids)
            booking = self._registry.reserve(plan, n, req.sampling.max_tokens)
            self.inflight += 1
            try:
                async for ev in self._run(rid, req, plan, arrival, booking, hashes):
                    trace.event(ev)
                    yield ev
            finally:
                self.inflight -= 1
                self._registry.release(booking)

    def route(self, req: GenerationRequest) -> tuple[Decision, list[bytes]]:
        """The policy's decision for req (logged), and the prompt's block hashes."""
        reg = self._registry
        views = reg.snapshot()
        block_size = views[0].block_size if views else 16
        hashes = prompt_hashes(req.prompt_token_ids, block_size)
        rr = RouteRequest(
            prompt_tokens=len(req.prompt_token_ids),
            max_tokens=req.sampling.max_tokens,
            prefix_hits=reg.prefix.hits(hashes, block_size),
            ttft_slo_ms=req.ttft_slo_ms or self.admission.slo_ttft_ms,
            itl_slo_ms=req.itl_slo_ms or self.admission.slo_itl_ms,
            prefill_pin=req.prefill_pin,
            decode_pin=req.decode_pin,
            seq=next(self._seq),
        )
        snap = reg.policy_snapshot()
        try:
            plan = decide(snap, rr, self.admission.policy)
        except NoWorker as e:
            self.decisions.decision(req.request_id, reg.version, snap, rr, None, str(e))
            raise Unavailable(str(e)) from e
        self.decisions.decision(req.request_id, reg.version, snap, rr, plan)
        return plan, hashes

    async def _run(
        self,
        rid: str,
        req: GenerationRequest,
        plan: Decision,
        arrival: float,
        booking: Reservation,
        hashes: list[bytes],
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
            async with self._dispatch.slot(plan.prefill.worker_id, plan.expected_prefill_ms):
                pre = await self._prefill(rid, req, plan.prefill, timing)
            self._registry.prefill_done(booking)
            if pre is not None:
                handle, cached, prefill_id = pre.handle, pre.cached_tokens, plan.prefill.worker_id
                self._learn(
                    prefill_id, plan, hashes, pre.prefill_ms, cached, len(req.prompt_token_ids)
                )
                timing.ttft_ms = _ms(arrival)
                yield relay.push([handle.first_token_id])
        decode = plan.decode
        try:
            if handle is not None and self._done_after_first(relay, req):
                await self._release(handle)
                handle = None
            else:
                local = handle is None
                lost: list[str] = []
                while True:
                    try:
                        async for ev in self._decode(
                            rid, req, decode, handle, relay, timing, arrival
                        ):
                            if handle is not None:
                                self._metrics.kv_handed_off(handle)
                            handle = None  # the decode worker owns the handoff now
                            if local and booking.prefill_open and ev.token_ids:
                                self._registry.prefill_done(booking)
                                self._learn(
                                    decode.worker_id, plan, hashes, timing.prefill_ms, None, 0
                                )
                            yield ev
                        break
                    except _DecodeLost as e:
                        lost.append(decode.worker_id)
                        if handle is not None:  # handed to a worker that is gone: free it now
                            await asyncio.shield(self._release(handle))
                            handle = None
                        decode = self._migration_target(rid, lost, e)
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
            decode_worker=decode.worker_id,
        )
        yield last

    def _learn(
        self,
        worker_id: str,
        plan: Decision,
        hashes: list[bytes],
        prefill_ms: float,
        cached: int | None,
        prompt_len: int,
    ) -> None:
        """Refines the worker's cost model; records the prompt's blocks as cached there.

        ``cached`` (a prefill worker's report) below what the index predicted means
        the worker evicted those blocks: the index forgets them there.
        """
        reg = self._registry
        tokens = plan.uncached_tokens
        if cached is not None and plan.prefill is not None:
            tokens = max(1, prompt_len - cached)
            if tokens > plan.uncached_tokens:
                reg.prefix.correct(worker_id, hashes, cached // plan.prefill.block_size)
        reg.observe_prefill(worker_id, tokens, prefill_ms)
        reg.record_prefix(worker_id, hashes)

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
        # After a migration the tokens already streamed become prompt: the new
        # worker recomputes their KV and continues exactly where the stream stopped.
        sampling = req.sampling
        if relay.generated and handle is None:
            sampling = dataclasses.replace(
                sampling, max_tokens=sampling.max_tokens - len(relay.generated)
            )
        msg = worker_pb2.DecodeRequest(
            request_id=rid,
            prompt_token_ids=[*req.prompt_token_ids, *(relay.generated if handle is None else ())],
            sampling=sampling_to_pb(sampling),
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
                raise _DecodeLost(f"{worker.worker_id}: {e.code().name} {e.details()}") from e
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

    def _migration_target(self, rid: str, lost: list[str], why: _DecodeLost) -> WorkerView:
        """Another decode worker for a request whose decode worker failed mid-stream."""
        live = [
            w for w in self._registry.snapshot() if w.role == "decode" and w.worker_id not in lost
        ]
        if len(lost) > _MAX_MIGRATIONS or not live:
            raise Unavailable(f"decode worker lost ({why}) and no other decode worker can continue")
        target = max(live, key=lambda w: (w.free_blocks, -w.running, w.worker_id))
        log.warning(
            "migrating request_id=%s from=%s to=%s reason=%s", rid, lost[-1], target.worker_id, why
        )
        self._metrics.migrated()
        return target

    async def _release(self, handle: common_pb2.KvHandle) -> None:
        stub = worker_pb2_grpc.PrefillWorkerStub(self._channel_for(handle.owner_address))
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.ReleaseKv(
                worker_pb2.ReleaseKvRequest(request_id=handle.request_id, consumed=False), timeout=5
            )
