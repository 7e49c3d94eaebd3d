"""One request's way through the cluster.

1. Admit (in-flight cap), then decide (disagg.policy, a pure function of the
   registry snapshot): route, or reject when the predicted TTFT/ITL breaks the
   request's SLO. Every decision goes to the decision log with its inputs; the
   request's loads are reserved in the registry.
2. Prefill on a prefill worker, in the scheduler's dispatch queue for that
   worker (shortest expected first, with aging): first token + an opaque KV
   ticket (READY in Redis). The first token is streamed to the client at once
   (TTFT). The observed prefill time refines the worker's cost model; the
   prompt's blocks go to the prefix index under that worker.
3. Decode: a decode worker takes the ticket, pulls the KV and streams the rest.
   Routed local (short prompt, long prefill queues), no prefill worker, or a
   prefill worker that is unreachable: the decode worker prefills the prompt
   itself. A decode worker lost mid-stream: the tokens streamed so far become
   prompt on another one (at most ``_MAX_MIGRATIONS`` times).
4. Finish: the last event with usage, timings and the workers that served it.
   A sampled greedy request (--verify-fraction, or its ``verify`` flag) that
   finished normally is queued for a collocated re-run (services.scheduler.verify):
   in the background, after the stream, never changing it.
Relay throughout: incremental detokenization, stop strings, token counts.
Cancellation at any point (client gone, stop string) cancels the worker
calls; a ticket not yet taken by a decode worker is released here, so its
blocks do not wait for the lease. Identity: a flight is keyed by its internal
id (``req.request_id``, made by ``requests.build_request``), which no client
chooses; its worker calls and its ticket belong to it alone, so a cancellation
(the client's stream ending) can reach nothing but its own request, whatever
id another client sends. Workers are reached only through
``services.scheduler.workers`` (no protobuf here).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

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
from disagg.transfer.transport import FALLBACK
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
from services.scheduler.verify import Verifier, VerifyJob
from services.scheduler.workers import (
    DecodeLost,
    DecodeUpdate,
    KvTicket,
    PrefillResult,
    PrefillUnreachable,
    WorkerClient,
)

log = logging.getLogger(__name__)


_MAX_MIGRATIONS = 2  # decode workers a request may lose before it fails
_STREAM_TRAIL_S = 1.0  # a streamed prefill's answer awaited this long after the stream ended


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


@dataclass
class _Flight:
    """One admitted request as it moves through the phases."""

    req: GenerationRequest
    plan: Decision
    hashes: list[bytes]  # the prompt's block hashes (prefix index)
    booking: Reservation  # its loads in the registry
    arrival: float  # monotonic
    relay: _Relay
    decode: WorkerView  # the decode worker now (another one after a migration)
    timing: Timing = field(default_factory=Timing)
    ticket: KvTicket | None = None  # prefilled KV no decode worker has taken yet
    cached: int = 0  # prompt tokens the prefill worker's prefix cache served
    prefill_id: str = ""  # the prefill worker; "" = prefilled on the decode worker
    lost: list[str] = field(default_factory=list)  # decode workers lost mid-stream
    # Layer-wise: the streamed prefill, running beside the decode (its ticket was taken
    # before the prompt ran; the first token comes from the decode worker).
    streaming: asyncio.Task[None] | None = None

    @property
    def local(self) -> bool:
        """Prefilled on the decode worker (routed so, or the prefill worker failed)."""
        return not self.prefill_id


def _continuation(f: _Flight) -> GenerationRequest:
    """What the decode worker is sent: after a migration without a ticket the tokens
    already streamed become prompt, so the new worker recomputes their KV and
    continues exactly where the stream stopped."""
    done = f.relay.generated
    if f.ticket is not None or not done:
        return f.req
    sampling = dataclasses.replace(f.req.sampling, max_tokens=f.req.sampling.max_tokens - len(done))
    return dataclasses.replace(
        f.req, prompt_token_ids=[*f.req.prompt_token_ids, *done], sampling=sampling
    )


@dataclass(frozen=True)
class Admission:
    """The scheduler's routing and admission settings (from SchedulerConfig)."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    slo_ttft_ms: float = 0.0  # default TTFT SLO; 0 = none (no TTFT admission)
    slo_itl_ms: float = 0.0  # default ITL SLO; 0 = none
    queue: QueueOrder = field(default_factory=QueueOrder)
    dispatch_depth: int = 2  # prefills in flight per prefill worker; more wait in our queue
    decision_log: str = ""  # JSONL path of the replayable decision log; "" = log lines only
    verify_fraction: float = 0.0  # greedy requests re-run collocated and compared; 0 = none
    stream_tokens: int = 0  # uncached prompt tokens from which the KV streams layer-wise; 0 = off


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
        verify_fraction=cfg.verify_fraction,
        stream_tokens=cfg.kv_stream_tokens,
    )


def slo_of(cfg: SchedulerConfig) -> Slo:
    """The SLO ``slo_met_total`` counts against: the configured one, else the metrics' default."""
    default = Slo()
    return Slo(cfg.slo_ttft_ms or default.ttft_ms, cfg.slo_itl_ms or default.tpot_ms)


def _check_fits(req: GenerationRequest, capacity: int) -> None:
    """InvalidRequest when no decode worker's whole KV pool (``capacity`` tokens, the
    largest; 0: none in view) holds prompt + max_tokens: such a request would fail on
    every worker (or, preempting everyone else, never finish)."""
    if not capacity:
        return  # routing answers UNAVAILABLE
    prompt, more = len(req.prompt_token_ids), req.sampling.max_tokens
    if prompt + more > capacity:
        raise InvalidRequest(
            "max_tokens",
            f"prompt ({prompt} tokens) + max_tokens ({more}) exceed the KV cache of the largest "
            f"decode worker ({capacity} tokens); lower max_tokens or shorten the prompt",
        )


class Orchestrator:
    def __init__(
        self,
        registry: WorkerRegistry,
        tokenizer: object,
        eos_token_ids: tuple[int, ...],
        workers: WorkerClient,
        max_inflight: int,
        metrics: SchedulerMetrics | None = None,
        admission: Admission | None = None,
    ):
        self._registry = registry
        self.admission = admission or Admission()
        self._metrics = metrics or SchedulerMetrics()  # observation only: never changes a decision
        self.decisions = DecisionLog(
            self.admission.policy, self.admission.decision_log, self._metrics.registry
        )
        registry.on_cost = self.decisions.cost
        for worker_id, model in registry.costs.items():  # seeded before the hook existed
            self.decisions.cost(worker_id, model)
        self._dispatch = PrefillDispatch(
            self.admission.queue,
            self.admission.dispatch_depth,
            lambda: registry.replicas,
            peers=registry.peer_slots,
            on_change=registry.loads_changed,
        )
        registry.dispatch_state = self._dispatch.state
        registry.on_peers = self._dispatch.kick
        self._seq = itertools.count()
        self._tok = tokenizer
        self._eos = frozenset(eos_token_ids)
        self._workers = workers
        self._max_inflight = max_inflight
        self.inflight = 0
        self._releasing: set[asyncio.Task[None]] = set()  # releases off the stream's path
        self.verifier = Verifier(
            workers,
            lambda: [w for w in registry.snapshot() if w.role == "decode"],
            self._metrics,
            self.admission.verify_fraction,
        )

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Yields events; raises Unavailable / Overloaded / InvalidRequest before the first one."""
        arrival = time.monotonic()
        with self._metrics.trace(arrival) as trace:
            if not self._registry.decode_capacity:
                # No decode worker in this view: before answering UNAVAILABLE, make sure
                # of it (a replica that just started, workers that just registered).
                await self._registry.fresh()
            f = self._admit(req, arrival)
            async with self._admitted(f) as events:
                async for ev in events:
                    trace.event(ev)
                    yield ev

    def route(self, req: GenerationRequest) -> tuple[Decision, list[bytes]]:
        """The policy's decision for req (logged), and the prompt's block hashes."""
        reg = self._registry
        views = reg.snapshot()
        _check_fits(req, reg.decode_capacity)
        block_size = views[0].block_size if views else 16
        hashes = prompt_hashes(req.prompt_token_ids, block_size, salt=req.cache_salt)
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
        rid, client_rid = req.request_id, req.client_request_id
        try:
            plan = decide(snap, rr, self.admission.policy)
        except NoWorker as e:
            self.decisions.decision(rid, reg.version, snap, rr, None, str(e), client_rid)
            raise Unavailable(str(e)) from e
        self.decisions.decision(rid, reg.version, snap, rr, plan, client_rid=client_rid)
        return plan, hashes

    # --- phase 1: admit and decide ---------------------------------------------------------

    def _admit(self, req: GenerationRequest, arrival: float) -> _Flight:
        """The in-flight cap, the routing decision, then the loads reserved (last: no raise after)."""
        if self.inflight >= self._max_inflight:
            raise Overloaded(
                f"{self.inflight} requests in flight (limit {self._max_inflight})",
                retry_after_s=1.0,
            )
        plan, hashes = self.route(req)
        if plan.rejected:
            raise Overloaded(plan.rejected, retry_after_s=plan.retry_after_s)
        relay = _Relay(
            IncrementalDetokenizer(self._tok, req.prompt_token_ids),
            StopStringMatcher(req.stop),
            self._eos,
            req.sampling.ignore_eos,
        )
        booking = self._registry.reserve(plan, len(req.prompt_token_ids), req.sampling.max_tokens)
        return _Flight(req, plan, hashes, booking, arrival, relay, decode=plan.decode)

    @contextlib.asynccontextmanager
    async def _admitted(self, f: _Flight) -> AsyncIterator[AsyncIterator[GenerationEvent]]:
        """The request's events, counted in flight; leaving the block undoes its reservation."""
        self.inflight += 1
        try:
            async with contextlib.aclosing(self._run(f)) as events:
                yield events
        finally:
            self.inflight -= 1
            self._registry.release(f.booking)

    async def _run(self, f: _Flight) -> AsyncGenerator[GenerationEvent, None]:
        """Phases 2-4 of an admitted request. The event that finishes the relay rides in
        the last event: one client message fewer a request (each costs the scheduler
        about as much as its routing)."""
        held: GenerationEvent | None = None
        try:
            first = await self._prefill_phase(f)
            if first is not None:
                if self._done_after_first(f.relay, f.req):
                    held = first
                else:
                    yield first
            async with contextlib.aclosing(self._decode_phase(f)) as events:
                async for ev in events:
                    if f.relay.finish:  # the last tokens: sent with the finish
                        held = ev
                    else:
                        yield ev
        finally:
            await self._release(f)  # a ticket no decode worker took (cancelled, done, lost)
            await asyncio.shield(self._end_stream(f))
        last = self._finish(f)
        if held is not None:
            last = dataclasses.replace(
                last, token_ids=held.token_ids + last.token_ids, text=held.text + last.text
            )
        self._verify_later(f, last)
        yield last

    # --- phase 2: prefill ------------------------------------------------------------------

    async def _prefill_phase(self, f: _Flight) -> GenerationEvent | None:
        """The first token's event after a prefill on a prefill worker; None: decode prefills
        (or, streamed, the decode worker streams the first token too)."""
        worker = f.plan.prefill
        if worker is None:
            return None
        if self._streams(f):
            await self._start_stream(f, worker)
            return None
        async with self._dispatch.slot(worker.worker_id, f.plan.expected_prefill_ms):
            pre = await self._prefill(f, worker)
        self._registry.prefill_done(f.booking)
        if pre is None:
            return None
        f.timing.queue_ms += pre.queue_ms
        f.timing.prefill_ms = pre.prefill_ms
        f.ticket, f.cached, f.prefill_id = pre.handle, pre.cached_tokens, worker.worker_id
        self._learn(f, worker.worker_id, pre.prefill_ms, pre.cached_tokens)
        f.timing.ttft_ms = _ms(f.arrival)
        return f.relay.push([pre.first_token_id])

    def _streams(self, f: _Flight) -> bool:
        """Layer-wise for this flight: a long enough uncached prompt, more than one token."""
        least = self.admission.stream_tokens
        return bool(least) and f.plan.uncached_tokens >= least and f.req.sampling.max_tokens > 1

    async def _start_stream(self, f: _Flight, worker: WorkerView) -> None:
        """Starts the streamed prefill (``f.streaming``) and returns with its ticket in
        ``f.ticket`` -- or none, when the prefill failed before it (the decode worker
        prefills). Its answer, later, refines the cost model like ``_prefill_phase``."""
        handed: asyncio.Future[KvTicket | None] = asyncio.get_running_loop().create_future()
        f.streaming = asyncio.create_task(self._stream_prefill(f, worker, handed))
        ticket = await handed
        if ticket is not None:
            f.ticket, f.prefill_id = ticket, worker.worker_id

    async def _stream_prefill(
        self, f: _Flight, worker: WorkerView, handed: asyncio.Future[KvTicket | None]
    ) -> None:
        pre = None
        try:
            async with self._dispatch.slot(worker.worker_id, f.plan.expected_prefill_ms):
                updates = self._workers.prefill_stream(worker, f.req)
                async with contextlib.aclosing(updates):
                    async for up in updates:
                        if isinstance(up, KvTicket):
                            handed.set_result(up)
                        else:
                            pre = up
        except PrefillUnreachable as e:
            log.warning("streamed prefill on %s failed (%s)", worker.worker_id, e.code)
            if f.req.prefill_pin and not handed.done():
                handed.set_exception(Unavailable(f"prefill_worker {f.req.prefill_pin!r}: {e}"))
        except InvalidRequest as e:
            if not handed.done():
                handed.set_exception(e)
        finally:
            if not handed.done():
                handed.set_result(None)
            self._registry.prefill_done(f.booking)
        if pre is not None:
            f.timing.queue_ms += pre.queue_ms
            f.timing.prefill_ms = pre.prefill_ms
            f.cached = pre.cached_tokens
            self._learn(f, worker.worker_id, pre.prefill_ms, pre.cached_tokens)

    async def _end_stream(self, f: _Flight) -> None:
        """The streamed prefill, if any, is over: awaited briefly (its answer may trail
        the decode's last token), else cancelled (its KV is freed on the worker)."""
        task, f.streaming = f.streaming, None
        if task is None:
            return
        if not task.done() and f.relay.finish in ("stop", "length"):
            await asyncio.wait({task}, timeout=_STREAM_TRAIL_S)
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _prefill(self, f: _Flight, worker: WorkerView) -> PrefillResult | None:
        """The prefill, or None when the worker failed (the decode worker prefills instead)."""
        try:
            return await self._workers.prefill(worker, f.req)
        except PrefillUnreachable as e:
            if f.req.prefill_pin:
                raise Unavailable(f"prefill_worker {f.req.prefill_pin!r}: {e}") from e
            log.warning(
                "prefill on %s failed (%s); prefilling on the decode worker",
                worker.worker_id,
                e.code,
            )
            return None

    def _learn(self, f: _Flight, worker_id: str, prefill_ms: float, cached: int | None) -> None:
        """Refines the worker's cost model; records the prompt's blocks as cached there.

        ``cached`` (a prefill worker's report) below what the index predicted means
        the worker evicted those blocks: the index forgets them there.
        """
        reg, plan = self._registry, f.plan
        tokens = plan.uncached_tokens
        if cached is not None and plan.prefill is not None:
            tokens = max(1, len(f.req.prompt_token_ids) - cached)
            if tokens > plan.uncached_tokens:
                reg.prefix.correct(worker_id, f.hashes, cached // plan.prefill.block_size)
        reg.observe_prefill(worker_id, tokens, prefill_ms)
        reg.record_prefix(worker_id, f.hashes)

    def _done_after_first(self, relay: _Relay, req: GenerationRequest) -> bool:
        if relay.finish:
            return True
        first = relay.completion_tokens  # 1
        if req.sampling.max_tokens <= first:
            relay.finish = "length"
            return True
        return False

    # --- phase 3: decode, with migration ---------------------------------------------------

    async def _decode_phase(self, f: _Flight) -> AsyncGenerator[GenerationEvent, None]:
        """The rest of the stream, unless the first token ended it; a decode worker
        lost mid-stream: on another one."""
        streamed = f.ticket is not None and f.ticket.streamed
        if f.ticket is not None and not streamed and self._done_after_first(f.relay, f.req):
            return
        while True:
            try:
                async with self._decoding(f) as events:
                    async for ev in events:
                        yield ev
                return
            except DecodeLost as e:
                f.lost.append(f.decode.worker_id)
                await self._release(f)  # handed to a worker that is gone: free it now
                f.decode = self._migration_target(f.req.request_id, f.lost, e)

    @contextlib.asynccontextmanager
    async def _decoding(self, f: _Flight) -> AsyncIterator[AsyncIterator[GenerationEvent]]:
        """One decode worker's events; leaving the block cancels the call."""
        updates = self._workers.decode(f.decode, _continuation(f), f.ticket)
        async with contextlib.aclosing(updates):
            yield self._events(f, updates)

    async def _events(
        self, f: _Flight, updates: AsyncIterator[DecodeUpdate]
    ) -> AsyncIterator[GenerationEvent]:
        """Updates as client events, until the stream or the relay finishes."""
        # This worker prefills (routed local, after a migration; or a streamed prefill's
        # fallback: its first update then says how long it took).
        fresh = f.ticket is None or f.ticket.streamed
        async for up in updates:
            ev = self._on_decode(f, up, fresh)
            if up.kv_transport == FALLBACK:
                self._release_later(f)
            self._taken(f, ev)
            yield ev
            if f.relay.finish:
                return

    def _on_decode(self, f: _Flight, up: DecodeUpdate, fresh: bool) -> GenerationEvent:
        t = f.timing
        if up.kv_transfer_ms:
            t.kv_transfer_ms = up.kv_transfer_ms
        if up.kv_transport:
            t.kv_transport = up.kv_transport
        if fresh and up.prefill_ms:
            t.prefill_ms, t.queue_ms = up.prefill_ms, t.queue_ms + up.queue_ms
        if up.token_ids and not t.ttft_ms:
            t.ttft_ms = _ms(f.arrival)
        ev = f.relay.push(list(up.token_ids))
        if up.finish_reason is not None:
            t.decode_ms = up.decode_ms
            f.relay.finish = f.relay.finish or up.finish_reason
        return ev

    def _release_later(self, f: _Flight) -> None:
        """Frees a handoff the decode worker fell back from, without delaying the stream:
        it may have refused the owner (not registered in its view of Redis), and then it
        neither read nor released the KV; the scheduler chose that owner from its own
        registry. A pull that failed released it already: a second release is a no-op."""
        ticket, f.ticket = f.ticket, None
        if ticket is not None:
            task = asyncio.create_task(self._workers.release(ticket))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    def _taken(self, f: _Flight, ev: GenerationEvent) -> None:
        """The decode worker answered: it owns the handoff; a local prefill is done."""
        if f.ticket is not None:
            self._metrics.kv_handed_off(f.ticket.nbytes)
            f.ticket = None
        if f.local and f.booking.prefill_open and ev.token_ids:
            self._registry.prefill_done(f.booking)
            self._learn(f, f.decode.worker_id, f.timing.prefill_ms, None)

    def _migration_target(self, rid: str, lost: list[str], why: DecodeLost) -> WorkerView:
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

    async def _release(self, f: _Flight) -> None:
        """Frees the flight's ticket, if it still holds one; completes even when cancelled."""
        ticket, f.ticket = f.ticket, None
        if ticket is not None:
            await asyncio.shield(self._workers.release(ticket))

    # --- phase 4: finish -------------------------------------------------------------------

    def _verify_later(self, f: _Flight, last: GenerationEvent) -> None:
        """Queues the collocated re-run of a sampled greedy request that finished normally."""
        if last.finish_reason in ("stop", "length") and self.verifier.wants(f.req):
            job = VerifyJob(f.req, tuple(f.relay.generated), f.decode.worker_id, f.prefill_id)
            self.verifier.submit(job)

    def _finish(self, f: _Flight) -> GenerationEvent:
        """The last event: the tail of the text, usage, timings, the workers that served it."""
        f.timing.e2e_ms = _ms(f.arrival)
        return GenerationEvent(
            token_ids=[],
            text=f.relay.tail(),
            finish_reason=f.relay.finish or "length",
            prompt_tokens=len(f.req.prompt_token_ids),
            completion_tokens=f.relay.completion_tokens,
            cached_tokens=f.cached,
            timing=f.timing,
            prefill_worker=f.prefill_id or f.plan.decode.worker_id,
            decode_worker=f.decode.worker_id,
        )
