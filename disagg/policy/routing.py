"""Where a request goes, decided from a snapshot of the workers (pure).

No gRPC, no Redis, no clock: ``decide`` is a function of a ``Snapshot`` (the
workers' heartbeats, the scheduler's own in-flight accounting, per-worker cost
models) and a ``RouteRequest``; the same inputs give the same ``Decision``,
which is what makes the decision log replayable (disagg.policy.trace).

Length-aware routing (the default), in order:
1. Decode placement: among decode workers with free KV blocks for the whole
   request (prompt + max_tokens), the smallest batch, then the most free blocks.
2. Prefill placement: the prefill worker with the earliest expected finish:
   its queue (scheduler-side + heartbeat) drained by its cost model, plus this
   prompt's *uncached* tokens there (prefix hits make a worker cheaper), plus
   the KV transfer.
3. Conditional disaggregation: the decode worker prefills locally when the
   uncached prompt is under ``local_prefill_tokens``, or when the best prefill
   worker's wait exceeds ``local_prefill_queue_ms`` and the decode worker has
   headroom and would finish sooner.
4. Admission: predicted TTFT (or ITL) over the request's SLO: rejected now,
   with a retry hint, instead of queued to miss it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from disagg.kvpool.hashing import blocks_for
from disagg.policy.cost import CostModel, DecodeCost

POLICIES = ("length_aware", "least_loaded", "round_robin")


@dataclass(frozen=True)
class WorkerView:
    """What the policy knows of one worker from its heartbeat."""

    worker_id: str
    address: str
    role: str  # prefill | decode
    free_blocks: int
    total_blocks: int
    block_size: int
    queued_prefill_tokens: int
    running: int
    waiting: int = 0


@dataclass(frozen=True)
class Load:
    """The scheduler's own accounting of one worker (exact for its requests, no heartbeat lag)."""

    requests: int = 0  # prefill: queued + running prefills; decode: streams in flight
    tokens: int = 0  # uncached prompt tokens still to prefill there
    blocks: int = 0  # decode: KV blocks its in-flight requests will hold


NO_LOAD = Load()


@dataclass(frozen=True)
class Snapshot:
    workers: Sequence[WorkerView]
    loads: Mapping[str, Load] = field(default_factory=dict)
    costs: Mapping[str, CostModel] = field(default_factory=dict)  # missing: the default prior


@dataclass(frozen=True)
class RouteRequest:
    prompt_tokens: int
    max_tokens: int
    prefix_hits: Mapping[str, int] = field(default_factory=dict)  # worker -> cached tokens
    ttft_slo_ms: float = 0.0  # 0 = none
    itl_slo_ms: float = 0.0  # 0 = none
    prefill_pin: str = ""
    decode_pin: str = ""
    seq: int = 0  # arrival number (round robin)


@dataclass(frozen=True)
class PolicyConfig:
    policy: str = "length_aware"  # length_aware | least_loaded | round_robin
    local_prefill_tokens: int = 0  # uncached prompts shorter than this prefill on decode (0 = off)
    local_prefill_queue_ms: float = 500.0  # prefill wait above which decode may prefill locally
    decode_headroom_seqs: int = 32  # decode may prefill locally while its batch is under this
    transfer_ms_per_token: float = 0.002  # KV pull cost per prompt token
    prefill_prior: CostModel = field(
        default_factory=CostModel
    )  # cost model of a worker not yet observed
    decode_cost: DecodeCost = field(default_factory=DecodeCost)  # ITL prediction for admission

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.local_prefill_tokens < 0 or self.local_prefill_queue_ms < 0:
            raise ValueError("local_prefill_tokens and local_prefill_queue_ms must be >= 0")


@dataclass(frozen=True)
class Decision:
    prefill: WorkerView | None  # None: the decode worker prefills
    decode: WorkerView
    reason: str
    uncached_tokens: int = 0  # prompt tokens the chosen prefiller must compute
    expected_prefill_ms: float = 0.0  # this prompt alone, on the chosen prefiller
    predicted_ttft_ms: float = 0.0
    predicted_itl_ms: float = 0.0
    rejected: str = ""  # non-empty: refused at admission, why
    retry_after_s: float = 0.0


class NoWorker(LookupError):
    """No worker can take the request; ``field`` names the pin at fault, if any."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


def find_pinned(workers: Sequence[WorkerView], role: str, pin: str) -> WorkerView:
    for w in workers:
        if w.role == role and pin in (w.worker_id, w.address):
            return w
    raise NoWorker(
        f"{role}_worker: no {role} worker {pin!r} in the registry", field=f"{role}_worker"
    )


def blocks_needed(prompt_len: int, max_tokens: int, block_size: int) -> int:
    return blocks_for(prompt_len + max_tokens, block_size)


# --- the pieces ------------------------------------------------------------------------------


def _cost(snap: Snapshot, cfg: PolicyConfig, worker_id: str) -> CostModel:
    return snap.costs.get(worker_id, cfg.prefill_prior)


def prefill_wait_ms(snap: Snapshot, cfg: PolicyConfig, w: WorkerView) -> float:
    """Expected time before worker w could start one more prefill."""
    load = snap.loads.get(w.worker_id, NO_LOAD)
    tokens = max(load.tokens, w.queued_prefill_tokens)  # heartbeat: other schedulers' work too
    return _cost(snap, cfg, w.worker_id).queue_ms(load.requests, tokens)


def uncached(req: RouteRequest, worker_id: str) -> int:
    return max(1, req.prompt_tokens - req.prefix_hits.get(worker_id, 0))


def free_after(snap: Snapshot, w: WorkerView) -> int:
    """Free blocks of w, less what the scheduler has already sent there (heartbeats lag)."""
    load = snap.loads.get(w.worker_id, NO_LOAD)
    return min(w.free_blocks, w.total_blocks - load.blocks)


def batch_of(snap: Snapshot, w: WorkerView) -> int:
    return max(w.running + w.waiting, snap.loads.get(w.worker_id, NO_LOAD).requests)


@dataclass(frozen=True)
class _Option:
    worker: WorkerView | None
    finish_ms: float
    prefill_ms: float
    uncached: int


def prefill_option(snap: Snapshot, cfg: PolicyConfig, req: RouteRequest, w: WorkerView) -> _Option:
    n = uncached(req, w.worker_id)
    own = _cost(snap, cfg, w.worker_id).prefill_ms(n)
    transfer = cfg.transfer_ms_per_token * req.prompt_tokens
    return _Option(w, prefill_wait_ms(snap, cfg, w) + own + transfer, own, n)


def local_option(snap: Snapshot, cfg: PolicyConfig, req: RouteRequest, d: WorkerView) -> _Option:
    n = uncached(req, d.worker_id)
    own = _cost(snap, cfg, d.worker_id).prefill_ms(n)
    return _Option(None, prefill_wait_ms(snap, cfg, d) + own, own, n)


def choose_decode(snap: Snapshot, req: RouteRequest, pool: Sequence[WorkerView]) -> WorkerView:
    """Fits the whole request, then smallest batch, then most free blocks, then id.

    None fits now: the roomiest (its engine queues or preempts, never OOMs).
    One pass, no per-worker allocation: this runs for every request over every worker.
    """
    if not pool:
        raise NoWorker("no decode worker is registered")
    loads, tokens = snap.loads, req.prompt_tokens + req.max_tokens
    best: tuple[int, int, int, str] | None = None  # (doesn't fit, batch, -free, id)
    chosen = pool[0]
    for w in pool:
        load = loads.get(w.worker_id, NO_LOAD)
        free = min(w.free_blocks, w.total_blocks - load.blocks)
        spare = free + tokens // -w.block_size  # free - blocks_needed
        batch = max(w.running + w.waiting, load.requests)
        key = (1, 0, -spare, w.worker_id) if spare < 0 else (0, batch, -free, w.worker_id)
        if best is None or key < best:
            best, chosen = key, w
    return chosen


def best_prefill(
    snap: Snapshot, cfg: PolicyConfig, req: RouteRequest, pool: Sequence[WorkerView]
) -> WorkerView:
    """The prefill worker with the earliest expected finish (then the lowest id).

    The same sum as ``prefill_option``, unrolled: one pass, no per-worker allocation.
    """
    loads, costs, hits, prior = snap.loads, snap.costs, req.prefix_hits, cfg.prefill_prior
    n = req.prompt_tokens
    best: tuple[float, str] | None = None
    chosen = pool[0]
    for w in pool:
        wid = w.worker_id
        load = loads.get(wid, NO_LOAD)
        c = costs.get(wid, prior)
        queued = max(load.tokens, w.queued_prefill_tokens)
        own = max(1, n - hits.get(wid, 0)) if hits else n
        finish = (c.base_ms * (load.requests + 1) + c.per_token_ms * (queued + own)) * c.scale
        key = (finish, wid)
        if best is None or key < best:
            best, chosen = key, w
    return chosen


def _by_role(workers: Sequence[WorkerView], role: str) -> list[WorkerView]:
    return [w for w in workers if w.role == role]


# --- policies ------------------------------------------------------------------------------


def decide(snap: Snapshot, req: RouteRequest, cfg: PolicyConfig = PolicyConfig()) -> Decision:
    """The route of one request; raises NoWorker when none can take it."""
    prefills, decodes = _by_role(snap.workers, "prefill"), _by_role(snap.workers, "decode")
    if cfg.policy == "round_robin":
        return _round_robin(snap, cfg, req, prefills, decodes)
    if cfg.policy == "least_loaded":
        return _least_loaded(snap, cfg, req, prefills, decodes)
    decode = (
        find_pinned(snap.workers, "decode", req.decode_pin)
        if req.decode_pin
        else choose_decode(snap, req, decodes)
    )
    if req.prefill_pin in (decode.worker_id, decode.address):  # pinned to decode: collocated
        return _finish(cfg, snap, req, decode, local_option(snap, cfg, req, decode), "pinned local")
    if req.prefill_pin:
        pinned = find_pinned(snap.workers, "prefill", req.prefill_pin)
        return _finish(cfg, snap, req, decode, prefill_option(snap, cfg, req, pinned), "pinned")
    local = local_option(snap, cfg, req, decode)
    if not prefills:
        return _finish(cfg, snap, req, decode, local, "no prefill worker: prefill on decode")
    best = prefill_option(snap, cfg, req, best_prefill(snap, cfg, req, prefills))
    if local.uncached < cfg.local_prefill_tokens:
        return _finish(cfg, snap, req, decode, local, "short prompt: prefill on decode")
    assert best.worker is not None
    wait = best.finish_ms - best.prefill_ms
    if (
        wait >= cfg.local_prefill_queue_ms
        and batch_of(snap, decode) < cfg.decode_headroom_seqs
        and local.finish_ms < best.finish_ms
    ):
        return _finish(cfg, snap, req, decode, local, "prefill queues long: prefill on decode")
    hit = req.prefix_hits.get(best.worker.worker_id, 0)
    return _finish(cfg, snap, req, decode, best, "prefix hit" if hit else "earliest finish")


def _finish(
    cfg: PolicyConfig,
    snap: Snapshot,
    req: RouteRequest,
    decode: WorkerView,
    opt: _Option,
    reason: str,
) -> Decision:
    itl = cfg.decode_cost.itl_ms(batch_of(snap, decode) + 1)
    d = Decision(opt.worker, decode, reason, opt.uncached, opt.prefill_ms, opt.finish_ms, itl)
    if req.ttft_slo_ms > 0 and opt.finish_ms > req.ttft_slo_ms:
        late = opt.finish_ms - req.ttft_slo_ms
        why = f"predicted TTFT {opt.finish_ms:.0f} ms exceeds the SLO of {req.ttft_slo_ms:g} ms"
        return _reject(d, why, late)
    if req.itl_slo_ms > 0 and itl > req.itl_slo_ms:
        why = f"predicted ITL {itl:.1f} ms exceeds the SLO of {req.itl_slo_ms:g} ms"
        return _reject(d, why, itl * 10)
    return d


def _reject(d: Decision, why: str, late_ms: float) -> Decision:
    """Retry hint: about when the queue ahead will have drained by the overshoot."""
    retry = min(30.0, max(0.1, round(late_ms / 1000, 1)))
    return Decision(
        d.prefill,
        d.decode,
        d.reason,
        d.uncached_tokens,
        d.expected_prefill_ms,
        d.predicted_ttft_ms,
        d.predicted_itl_ms,
        rejected=why,
        retry_after_s=retry,
    )


def _round_robin(
    snap: Snapshot,
    cfg: PolicyConfig,
    req: RouteRequest,
    prefills: list[WorkerView],
    decodes: list[WorkerView],
) -> Decision:
    if not decodes:
        raise NoWorker("no decode worker is registered")
    decode = sorted(decodes, key=lambda w: w.worker_id)[req.seq % len(decodes)]
    if not prefills:
        return _plain(snap, cfg, req, decode, None, "round robin")
    prefill = sorted(prefills, key=lambda w: w.worker_id)[req.seq % len(prefills)]
    return _plain(snap, cfg, req, decode, prefill, "round robin")


def _least_loaded(
    snap: Snapshot,
    cfg: PolicyConfig,
    req: RouteRequest,
    prefills: list[WorkerView],
    decodes: list[WorkerView],
) -> Decision:
    """The baseline: fewest requests in flight (then queued tokens), most free blocks."""
    if not decodes:
        raise NoWorker("no decode worker is registered")

    def count(w: WorkerView) -> int:
        return snap.loads.get(w.worker_id, NO_LOAD).requests

    decode = min(decodes, key=lambda w: (count(w), -free_after(snap, w), w.worker_id))
    if not prefills:
        return _plain(snap, cfg, req, decode, None, "least loaded")
    prefill = min(prefills, key=lambda w: (count(w), w.queued_prefill_tokens, w.worker_id))
    return _plain(snap, cfg, req, decode, prefill, "least loaded")


def _plain(
    snap: Snapshot,
    cfg: PolicyConfig,
    req: RouteRequest,
    decode: WorkerView,
    prefill: WorkerView | None,
    reason: str,
) -> Decision:
    """A baseline's choice, with the same predictions (logged, never used to refuse)."""
    opt = (
        prefill_option(snap, cfg, req, prefill)
        if prefill is not None
        else local_option(snap, cfg, req, decode)
    )
    itl = cfg.decode_cost.itl_ms(batch_of(snap, decode) + 1)
    return Decision(prefill, decode, reason, opt.uncached, opt.prefill_ms, opt.finish_ms, itl)
