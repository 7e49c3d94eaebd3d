"""Discrete-event simulation of a disaggregated (or collocated) cluster, in simulated time.

A request's lifecycle:

1. It arrives and is routed: to a decode worker when the cluster has no
   prefill workers (collocated) or its prompt is shorter than
   ``local_prefill_tokens`` (conditional disaggregation), else to the prefill
   worker with the fewest queued prompt tokens (earliest finish).
   A prefill worker gets at most ``Cluster.dispatch_depth`` prompts at once;
   the rest wait in the scheduler's queue and go next by its ``QueueOrder``
   (shortest expected prefill first, with aging), as the scheduler's
   dispatch queue does.
2. Prefill: each engine step takes waiting prompts FIFO, in chunks, up to
   ``max_num_batched_tokens``; on a decode worker the running decodes share
   that step (decodes first, as the engine's step scheduler does), and the step
   costs ``decode_ms(batch, context) + prefill_ms(chunk tokens)`` (context: the
   batch's mean, or its longest where the profile says attention pads to it).
3. The step that completes a prompt emits the first token (TTFT).
4. After a remote prefill the KV handoff takes ``transfer_ms(prompt)``, then the
   request joins the decode worker with the fewest sequences (chosen at the
   first token, counting handoffs in flight). Where the decode worker's own
   compute moves the KV (``transfer_blocks_decode``: a CPU pull), its next step
   is longer by the transfer time.
5. Decode: one token per step for each running request (at most
   ``max_num_seqs``; the rest wait for a slot) until ``output`` tokens.

Not modelled: KV capacity (pools are assumed big enough), prefix caching,
scheduler and RPC overheads other than the KV handoff, preemption. No I/O, no
clock: the result is a pure function of the inputs.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from disagg.plan.profile import Profile, Profiles
from disagg.plan.workload import SimRequest
from disagg.policy.queue import QueueOrder, Waiting


@dataclass(frozen=True)
class Cluster:
    """How many workers of each role, and the conditional-disaggregation threshold."""

    prefill: int
    decode: int
    local_prefill_tokens: int = 0  # prompts shorter than this prefill on the decode worker
    dispatch_depth: int = 2  # prompts in flight per prefill worker (the scheduler's default)

    def __post_init__(self) -> None:
        if self.prefill < 0 or self.decode < 1 or self.local_prefill_tokens < 0:
            raise ValueError("need prefill >= 0, decode >= 1, local_prefill_tokens >= 0")
        if self.dispatch_depth < 1:
            raise ValueError("dispatch_depth must be >= 1")

    @property
    def collocated(self) -> bool:
        return self.prefill == 0

    def label(self) -> str:
        if self.collocated:
            return f"colloc x{self.decode}"
        local = f" local<{self.local_prefill_tokens}" if self.local_prefill_tokens else ""
        return f"{self.prefill}P:{self.decode}D{local}"


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); nan when empty."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class SimResult:
    ttft_ms: list[float]  # per request, request order
    tpot_ms: list[float | None]  # per request: (last - first token) / (output - 1)
    itl_ms: list[float]  # every gap between consecutive tokens of a request
    duration_s: float  # first arrival to last token
    busy: dict[str, float] = field(default_factory=dict)  # role -> mean busy fraction

    def attainment(self, ttft_ms: float, tpot_ms: float) -> float:
        """Share of requests with TTFT <= ttft_ms and TPOT <= tpot_ms."""
        ok = sum(
            t <= ttft_ms and (p is None or p <= tpot_ms)
            for t, p in zip(self.ttft_ms, self.tpot_ms, strict=True)
        )
        return ok / max(len(self.ttft_ms), 1)

    def stats(self) -> dict[str, float]:
        return {
            "ttft_p50_ms": percentile(self.ttft_ms, 50),
            "ttft_p99_ms": percentile(self.ttft_ms, 99),
            "itl_p50_ms": percentile(self.itl_ms, 50),
            "itl_p99_ms": percentile(self.itl_ms, 99),
        }


class _Live:
    """One request inside the simulation."""

    __slots__ = ("ctx", "emitted", "first", "i", "last", "left", "output", "prompt")

    def __init__(self, i: int, r: SimRequest):
        self.i, self.prompt, self.output = i, r.prompt, r.output
        self.left = r.prompt  # prompt tokens not yet prefilled
        self.emitted = 0
        self.ctx = r.prompt
        self.first = self.last = 0.0


class _Worker:
    __slots__ = (
        "busy_ms",
        "costs",
        "ctx_sum",
        "joining",
        "p",
        "pending",
        "queue",
        "queued",
        "role",
        "running",
        "stall_ms",
        "stepping",
        "waiting",
    )

    def __init__(self, role: str, profile: Profile):
        self.role, self.p = role, profile
        self.queue: deque[_Live] = deque()  # prompts to prefill, FIFO
        self.waiting: dict[int, tuple[_Live, Waiting]] = {}  # the scheduler's, before dispatch
        self.running: list[_Live] = []  # decoding
        self.joining: deque[_Live] = deque()  # prefilled, waiting for a batch slot
        self.pending = 0  # handoffs on their way here
        self.queued = 0  # prompt tokens in queue and waiting
        self.ctx_sum = 0  # context tokens of running
        self.stepping = False
        self.busy_ms = 0.0
        self.costs: dict[tuple[int, int], float] = {}  # (batch, context // 8) -> decode step ms
        self.stall_ms = 0.0  # KV pulls this worker's compute owes before its next step

    def decode_ms(self, batch: int) -> float:
        if self.p.decode_context == "max":  # attention padded to the longest context
            key = (batch, max(live.ctx for live in self.running) // 8)
        else:
            key = (batch, self.ctx_sum // (8 * batch))
        ms = self.costs.get(key)
        if ms is None:
            ms = self.costs[key] = self.p.decode_ms(batch, key[1] * 8 + 4)
        return ms

    def load(self) -> int:
        return len(self.running) + len(self.joining) + self.pending + len(self.queue)

    def dispatch(self, t: float, depth: int, order: QueueOrder) -> None:
        """Moves waiting prompts into the engine queue while fewer than depth are there."""
        now_ms = t * 1000.0
        while self.waiting and len(self.queue) < depth:
            w = order.pick([x for _, x in self.waiting.values()], now_ms)
            live, _ = self.waiting.pop(w.key)
            self.queue.append(live)


class _Sim:
    def __init__(self, profiles: Profiles, cluster: Cluster, requests: Sequence[SimRequest]):
        self.cluster = cluster
        dprof = profiles.colloc if cluster.collocated else profiles.decode
        self.prefills = [_Worker("prefill", profiles.prefill) for _ in range(cluster.prefill)]
        self.decodes = [_Worker("decode", dprof) for _ in range(cluster.decode)]
        self.requests = requests
        n = len(requests)
        self.ttft: list[float] = [math.nan] * n
        self.tpot: list[float | None] = [None] * n
        self.itl: list[float] = []
        self.events: list[tuple[float, int, int, object, object]] = []
        self.seq = 0
        self.end = 0.0
        self.order = QueueOrder()

    def push(self, t: float, kind: int, a: object, b: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, a, b))

    def run(self) -> SimResult:
        for i, r in enumerate(self.requests):
            self.push(r.arrival_s, 0, i)
        while self.events:
            t, _, kind, a, b = heapq.heappop(self.events)
            if kind == 0:
                self.arrive(t, a)  # type: ignore[arg-type]
            elif kind == 1:
                self.step_end(t, a, b)  # type: ignore[arg-type]
            else:
                self.join(t, a, b)  # type: ignore[arg-type]
        return self.result()

    def arrive(self, t: float, i: int) -> None:
        live = _Live(i, self.requests[i])
        local = self.cluster.collocated or live.prompt < self.cluster.local_prefill_tokens
        pool = self.decodes if local else self.prefills
        w = min(pool, key=(lambda w: w.load()) if local else (lambda w: w.queued))
        w.queued += live.prompt
        if local:
            w.queue.append(live)
        else:
            expected = w.p.prefill_ms(live.prompt)
            w.waiting[i] = (live, Waiting(i, expected, t * 1000.0))
            w.dispatch(t, self.cluster.dispatch_depth, self.order)
        self.start(w, t)

    def start(self, w: _Worker, t: float) -> None:
        if w.stepping:
            return
        while w.joining and len(w.running) < w.p.max_num_seqs:
            live = w.joining.popleft()
            w.running.append(live)
            w.ctx_sum += live.ctx
        decodes = list(w.running)
        budget = w.p.max_num_batched_tokens - len(decodes)
        chunks: list[tuple[_Live, int]] = []
        for live in w.queue:
            if budget <= 0:
                break
            n = min(live.left, budget)
            chunks.append((live, n))
            budget -= n
        if not decodes and not chunks:
            return
        ms = w.p.prefill_ms(sum(n for _, n in chunks)) + w.stall_ms
        w.stall_ms = 0.0
        if decodes:
            ms += w.decode_ms(len(decodes))
        w.stepping = True
        w.busy_ms += ms
        self.push(t + ms / 1000.0, 1, w, (decodes, chunks))

    def step_end(
        self, t: float, w: _Worker, work: tuple[list[_Live], list[tuple[_Live, int]]]
    ) -> None:
        decodes, chunks = work
        w.stepping = False
        done = set()
        for live in decodes:
            self.itl.append((t - live.last) * 1000.0)
            live.last = t
            live.emitted += 1
            live.ctx += 1
            w.ctx_sum += 1
            if live.emitted >= live.output:
                done.add(live.i)
                w.ctx_sum -= live.ctx
                self.finish(live, t)
        if done:
            w.running = [x for x in w.running if x.i not in done]
        for live, n in chunks:
            live.left -= n
            w.queued -= n
            if live.left == 0:
                w.queue.popleft()  # chunks come from the queue's head, in order
                self.first_token(t, w, live)
        if w.waiting:
            w.dispatch(t, self.cluster.dispatch_depth, self.order)
        self.start(w, t)

    def first_token(self, t: float, w: _Worker, live: _Live) -> None:
        live.first = live.last = t
        live.emitted = 1
        self.ttft[live.i] = (t - self.requests[live.i].arrival_s) * 1000.0
        if live.output <= 1:
            self.finish(live, t)
        elif w.role == "decode":
            w.joining.append(live)
        else:
            d = min(self.decodes, key=lambda d: len(d.running) + len(d.joining) + d.pending)
            d.pending += 1
            self.push(t + w.p.transfer_ms(live.prompt) / 1000.0, 2, d, live)

    def join(self, t: float, d: _Worker, live: _Live) -> None:
        d.pending -= 1
        if d.p.transfer_blocks_decode:
            d.stall_ms += d.p.transfer_ms(live.prompt)
        d.joining.append(live)
        self.start(d, t)

    def finish(self, live: _Live, t: float) -> None:
        if live.output > 1:
            self.tpot[live.i] = (t - live.first) * 1000.0 / (live.output - 1)
        self.end = max(self.end, t)

    def result(self) -> SimResult:
        t0 = self.requests[0].arrival_s if self.requests else 0.0
        span_ms = max(self.end - t0, 1e-9) * 1000.0
        busy = {}
        for role, pool in (("prefill", self.prefills), ("decode", self.decodes)):
            if pool:
                busy[role] = sum(w.busy_ms for w in pool) / len(pool) / span_ms
        return SimResult(self.ttft, self.tpot, self.itl, span_ms / 1000.0, busy)


def simulate(profiles: Profiles, cluster: Cluster, requests: Sequence[SimRequest]) -> SimResult:
    """Runs every request to completion; deterministic for the same inputs."""
    return _Sim(profiles, cluster, requests).run()
