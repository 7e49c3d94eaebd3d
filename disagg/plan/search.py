"""Goodput under an SLO, and the cluster layout that maximizes it.

Goodput (DistServe): the highest request rate at which at least ``target`` of
the requests meet both TTFT <= ``ttft_ms`` and TPOT <= ``tpot_ms``. Found by
doubling then bisecting the rate, each probe a simulation of the same request
draws rescaled in time (common random numbers, so layouts are compared on the
same requests).

Large clusters are simulated as identical cells of at most ``max_sim_gpus``
GPUs with the same P:D ratio; goodput scales with the number of cells. That
ignores the pooling gain of one big pool (so it is a lower bound), and keeps
the search seconds long at 512 GPUs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from disagg.plan.profile import Profiles
from disagg.plan.sim import Cluster, SimResult, simulate
from disagg.plan.workload import LengthClass, SimRequest, at_rate, poisson


@dataclass(frozen=True)
class Slo:
    ttft_ms: float
    tpot_ms: float
    target: float = 0.9  # share of requests that must meet both

    def __post_init__(self) -> None:
        if self.ttft_ms <= 0 or self.tpot_ms <= 0 or not 0 < self.target <= 1:
            raise ValueError("SLO limits must be > 0 and target in (0, 1]")


# Requests at a given rate: Poisson draws of a mix, or a trace rescaled in time.
Arrivals = Callable[[float], Sequence[SimRequest]]


def mix_arrivals(classes: Sequence[LengthClass], n: int, seed: int = 0) -> Arrivals:
    base = poisson(classes, 1.0, n, seed)  # the same draws at every rate
    return lambda rate: [SimRequest(r.arrival_s / rate, r.prompt, r.output) for r in base]


def trace_arrivals(requests: Sequence[SimRequest]) -> Arrivals:
    return lambda rate: at_rate(requests, rate)


def meets(result: SimResult, slo: Slo) -> bool:
    return result.attainment(slo.ttft_ms, slo.tpot_ms) >= slo.target


def goodput(
    profiles: Profiles,
    cluster: Cluster,
    arrivals: Arrivals,
    slo: Slo,
    guess: float = 1.0,
    rel_tol: float = 0.05,
) -> float:
    """Highest rate (req/s) meeting the SLO for this cluster; 0.0 if even a trickle misses it;
    ``math.inf`` if the rate never binds: the SLO holds even with every simulated request
    arriving at once (a loose SLO or too few ``--requests``), so no finite rate is the answer."""

    def ok(rate: float) -> bool:
        return meets(simulate(profiles, cluster, arrivals(rate)), slo)

    lo, hi = 0.0, max(guess, 1e-3)
    while ok(hi):
        lo, hi = hi, hi * 2
        if hi > 1e7:
            return math.inf
    if lo == 0.0:  # walk down until something passes
        while hi > 1e-4 and not ok(hi / 2):
            hi /= 2
        if hi <= 1e-4:
            return 0.0
        lo = hi / 2
    while hi - lo > rel_tol * lo:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


@dataclass(frozen=True)
class Candidate:
    cluster: Cluster  # the layout for the whole cluster
    goodput_rps: float  # of the whole cluster
    gpus: int

    @property
    def per_gpu(self) -> float:
        return self.goodput_rps / self.gpus


@dataclass(frozen=True)
class Recommendation:
    gpus: int
    best: Candidate
    collocated: Candidate
    candidates: tuple[Candidate, ...]
    cell_gpus: int  # GPUs simulated per cell (== gpus when the cluster was simulated whole)


def _cell(gpus: int, gpus_per_worker: int, max_sim_gpus: int) -> tuple[int, int]:
    """(workers per cell, cells): the largest divisor of the cluster that fits max_sim_gpus."""
    workers = gpus // gpus_per_worker
    if workers < 1:
        raise ValueError(f"{gpus} GPUs cannot hold one worker of {gpus_per_worker} GPUs")
    cap = max(2, max_sim_gpus // gpus_per_worker)
    per = max(d for d in range(1, min(workers, cap) + 1) if workers % d == 0)
    return per, workers // per


def _split_candidates(workers: int) -> list[int]:
    """Prefill-worker counts to try in a cell: every split when small, a grid of ratios else."""
    if workers <= 8:
        return list(range(1, workers))
    fractions = [i / 8 for i in range(1, 8)]
    grid = {min(workers - 1, max(1, round(f * workers))) for f in fractions}
    return sorted(grid | {1, workers - 1})


def _refine(best: int, tried: set[int], workers: int) -> list[int]:
    """Splits next to the best one not tried yet (the grid's gaps around it)."""
    below = max([p for p in tried if p < best], default=best)
    above = min([p for p in tried if p > best], default=best)
    return [p for p in range(below + 1, above) if p != best and 0 < p < workers]


def recommend(
    profiles: Profiles,
    gpus: int,
    arrivals: Arrivals,
    slo: Slo,
    thresholds: Sequence[int] = (0, 128, 256, 512, 1024),
    max_sim_gpus: int = 16,
    guess_per_worker: float = 1.0,
    memo: dict[Cluster, float] | None = None,
) -> Recommendation:
    """The P:D split and local-prefill threshold with the highest goodput on ``gpus`` GPUs.

    Tries collocated workers, then the P:D splits of a cell with no local
    prefill (every split up to 8 workers; else a grid of eighths, both ends,
    then every split between the best one's grid neighbours), then each
    threshold on the best split. ``memo`` (cell layout ->
    goodput) lets calls for several cluster sizes with the same cell share work.
    """
    gpw = profiles.decode.gpus_per_worker
    per, cells = _cell(gpus, gpw, max_sim_gpus)
    memo = {} if memo is None else memo

    def score(c: Cluster) -> Candidate:
        if c not in memo:
            memo[c] = goodput(profiles, c, arrivals, slo, guess=guess_per_worker * per)
        g = memo[c]
        whole = Cluster(c.prefill * cells, c.decode * cells, c.local_prefill_tokens)
        return Candidate(whole, g * cells, gpus)

    colloc = score(Cluster(0, per))
    splits = _split_candidates(per)
    tried = [score(Cluster(p, per - p)) for p in splits]
    first = max(tried, key=lambda c: c.goodput_rps).cluster.prefill // cells
    tried += [score(Cluster(p, per - p)) for p in _refine(first, set(splits), per)]
    top = sorted(tried, key=lambda c: -c.goodput_rps)[:1]
    for cand in top:
        p, d = cand.cluster.prefill // cells, cand.cluster.decode // cells
        tried += [score(Cluster(p, d, t)) for t in thresholds if t > 0]
    best = max([colloc, *tried], key=lambda c: (c.goodput_rps, -c.cluster.local_prefill_tokens))
    return Recommendation(gpus, best, colloc, tuple(tried), per * gpw)
