"""Flags and the top level of `disagg plan` (the only I/O of the planner: files and stdout).

disagg plan --profile P.json [--gpus 8 64 512] [--mix SPEC | --trace T.jsonl]
            [--slo-ttft-ms X --slo-tpot-ms Y]            # recommend a layout per size
disagg plan --profile P.json --simulate --prefill 1 --decode 1 --rate 2   # one layout, one rate
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from disagg.plan.front import FrontCost, front_cost

if TYPE_CHECKING:
    from disagg.plan.profile import Profiles
    from disagg.plan.search import Recommendation, Slo
    from disagg.plan.sim import Cluster


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile", required=True, help="worker profile JSON (benchmarks/engine.py --profile-out)"
    )
    p.add_argument("--prefill-profile", help="profile of a prefill worker (default: --profile)")
    p.add_argument("--decode-profile", help="profile of a decode worker (default: --profile)")
    p.add_argument("--colloc-profile", help="profile of a collocated worker (default: --profile)")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512], help="cluster sizes")
    p.add_argument("--mix", help="weight:prompt_lo-hi:output_lo-hi,... (default: the profile's)")
    p.add_argument(
        "--trace", help="JSONL trace instead of --mix (input_len, output_len, timestamp)"
    )
    p.add_argument("--slo-ttft-ms", type=float, help="TTFT limit (default: the profile's)")
    p.add_argument(
        "--slo-tpot-ms", type=float, help="time-per-output-token limit (default: the profile's)"
    )
    p.add_argument("--target", type=float, default=0.9, help="share of requests within the SLO")
    p.add_argument(
        "--thresholds", default="0,128,256,512,1024", help="local-prefill thresholds to try"
    )
    p.add_argument("--max-sim-gpus", type=int, default=16, help="largest cell simulated whole")
    p.add_argument("--requests", type=int, default=0, help="simulated requests per probe (0: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scheduler-cost",
        help="benchmarks/scheduler.py JSON: size the scheduler replicas from its request_cpu_ms "
        "and token_cpu_us (default: the profile's 'scheduler' key; none: the front is not sized)",
    )
    s = p.add_argument_group("one layout (--simulate)")
    s.add_argument("--simulate", action="store_true", help="simulate one layout at one rate")
    s.add_argument("--prefill", type=int, default=1)
    s.add_argument("--decode", type=int, default=1)
    s.add_argument("--local-prefill-tokens", type=int, default=0)
    s.add_argument("--rate", type=float, default=1.0, help="requests/s")
    p.add_argument("--json", dest="json_path", help="write the result here")


def _load(path: str) -> dict[str, Any]:
    with open(path) as f:
        return dict(json.load(f))


def _profiles(args: argparse.Namespace, base: dict[str, Any]) -> Any:
    from disagg.plan.profile import Profiles, from_json

    def one(path: str | None) -> Any:
        return from_json(_load(path) if path else base, path or args.profile)

    return Profiles(one(args.prefill_profile), one(args.decode_profile), one(args.colloc_profile))


def _load_trace(path: str) -> list[Any]:
    """The trace's requests; OSError / ValueError (with the line) for a bad file."""
    from disagg.plan import workload

    recs = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except ValueError as e:
                    raise ValueError(f"{path}:{i}: not a JSON object ({e})") from None
    requests = workload.from_trace(recs)
    workload.at_rate(requests, 1.0)  # a trace that cannot be rescaled fails here, not mid-search
    return requests


def _requests(args: argparse.Namespace, inputs: _Inputs, n: int) -> Any:
    """(arrivals at a rate, description)."""
    from disagg.plan import search, workload

    if inputs.trace is not None:
        return search.trace_arrivals(inputs.trace), f"trace {args.trace}"
    mix = args.mix or inputs.defaults.get("mix") or "0.5:1350-1650:8-24,0.5:32-96:96-160"
    return search.mix_arrivals(workload.parse_mix(mix), n, args.seed), f"mix {mix}"


@dataclass(frozen=True)
class _Inputs:
    """What every mode needs, read from the flags and the profile file(s)."""

    profiles: Profiles
    defaults: dict[str, Any]  # the profile's planner_defaults
    slo: Slo
    thresholds: list[int]  # local-prefill thresholds to try
    front: FrontCost | None  # scheduler CPU costs; None: the front is not sized
    trace: list[Any] | None  # --trace's requests; None: the mix


def _inputs(args: argparse.Namespace) -> _Inputs:
    """Raises OSError, ValueError or KeyError for a bad profile or flag."""
    from disagg.plan import search

    base = _load(args.profile)
    defaults = dict(base.get("planner_defaults") or {})
    profiles = _profiles(args, base)
    ttft = args.slo_ttft_ms or float(defaults.get("slo_ttft_ms", 0))
    tpot = args.slo_tpot_ms or float(defaults.get("slo_tpot_ms", 0))
    if not ttft or not tpot:
        raise ValueError(
            f"{args.profile} has no planner_defaults SLO: give --slo-ttft-ms and --slo-tpot-ms"
        )
    slo = search.Slo(ttft, tpot, args.target)
    thresholds = [int(t) for t in args.thresholds.split(",") if t.strip()]
    front = None
    if args.scheduler_cost:
        front = front_cost(_load(args.scheduler_cost), args.scheduler_cost)
    elif "scheduler" in base:
        front = front_cost(base["scheduler"], f"{args.profile}: scheduler")
    trace = _load_trace(args.trace) if args.trace else None
    return _Inputs(profiles, defaults, slo, thresholds, front, trace)


def run(args: argparse.Namespace) -> int:
    try:
        inputs = _inputs(args)
    except (OSError, ValueError, KeyError) as e:
        print(f"disagg plan: {e}", file=sys.stderr)
        return 2
    if args.simulate:
        out = _simulate_one(args, inputs)
        print(json.dumps(out, indent=2))
        _write(args.json_path, out)
        return 0
    results = _recommend_each_size(args, inputs)
    _write(args.json_path, {"slo": inputs.slo.__dict__, "recommendations": results})
    return 0


def _simulate_one(args: argparse.Namespace, inputs: _Inputs) -> dict[str, Any]:
    """--simulate: one layout at one rate; the simulator's stats as a JSON-ready dict."""
    from disagg.plan.sim import Cluster, simulate

    cluster = Cluster(args.prefill, args.decode, args.local_prefill_tokens)
    arrivals, what = _requests(args, inputs, args.requests or 500)
    res = simulate(inputs.profiles, cluster, arrivals(args.rate))
    return {
        "layout": cluster.label(),
        "rate": args.rate,
        "workload": what,
        "attainment": res.attainment(inputs.slo.ttft_ms, inputs.slo.tpot_ms),
        **res.stats(),
        "busy": res.busy,
    }


def _recommend_each_size(args: argparse.Namespace, inputs: _Inputs) -> list[dict[str, Any]]:
    """Prints the SLO and one recommendation line per --gpus size; returns their records."""
    from disagg.plan import search

    slo = inputs.slo
    memo: dict[Cluster, float] = {}  # shared across sizes: cells of the same shape repeat
    print(
        f"SLO: TTFT <= {slo.ttft_ms:g} ms, TPOT <= {slo.tpot_ms:g} ms for {100 * slo.target:g}% of requests"
    )
    results = []
    for gpus in args.gpus:
        cell = min(gpus, args.max_sim_gpus)
        arrivals, what = _requests(args, inputs, args.requests or max(400, 100 * cell))
        rec = search.recommend(
            inputs.profiles, gpus, arrivals, slo, inputs.thresholds, args.max_sim_gpus, memo=memo
        )
        print(_summary(rec, what))
        record = _record(rec)
        if inputs.front is not None and math.isfinite(rec.best.goodput_rps):
            record["front"] = _front(inputs.front, rec, arrivals)
            print(_front_line(record["front"]))
        results.append(record)
    return results


def _front(front: FrontCost, rec: Recommendation, arrivals: Any) -> dict[str, Any]:
    """The scheduler replicas the recommended cluster's goodput needs."""
    sample = arrivals(1.0)
    mean_output = sum(r.output for r in sample) / max(1, len(sample))
    rps = rec.best.goodput_rps
    tok_s = rps * mean_output
    return {
        "schedulers": front.replicas(rps, tok_s),
        "scheduler_cores": round(front.cores(rps, tok_s), 3),
        "requests_per_s": round(rps, 1),
        "tokens_per_s": round(tok_s, 1),
        "request_cpu_ms": front.request_cpu_ms,
        "token_cpu_us": front.token_cpu_us,
        "core_budget": front.core_budget,
        "source": front.source,
    }


def _front_line(f: dict[str, Any]) -> str:
    return (
        f"  front: {f['schedulers']} scheduler replicas ({f['requests_per_s']:g} req/s x "
        f"{f['request_cpu_ms']:g} ms + {f['tokens_per_s']:g} tok/s x {f['token_cpu_us']:g} us "
        f"= {f['scheduler_cores']:g} cores, each replica planned at {f['core_budget']:g} of a core)"
    )


def _rate(rps: float, per_gpu: float) -> str:
    if math.isinf(rps):
        return "unbounded (the SLO holds with every request at once)"
    return f"{rps:.1f} req/s ({per_gpu:.2f} per GPU)"


def _summary(rec: Recommendation, what: str) -> str:
    b, c = rec.best, rec.collocated
    line = (
        f"{rec.gpus} GPUs ({what}; simulated as cells of {rec.cell_gpus}): "
        f"recommend {b.cluster.prefill} prefill : {b.cluster.decode} decode, local-prefill "
        f"threshold {b.cluster.local_prefill_tokens} tokens -> goodput "
        f"{_rate(b.goodput_rps, b.per_gpu)}; collocated {_rate(c.goodput_rps, c.per_gpu)}"
    )
    if b.goodput_rps == 0:
        return line + ": no layout meets the SLO even at a trickle; loosen it or add GPUs"
    if math.isinf(b.goodput_rps):
        return line + ": the rate does not bind; tighten the SLO or raise --requests"
    if c.goodput_rps > 0 and math.isfinite(c.goodput_rps):
        return line + f", x{b.goodput_rps / c.goodput_rps:.2f}"
    return line


def _record(rec: Recommendation) -> dict[str, Any]:
    b, c = rec.best, rec.collocated
    return {
        "gpus": rec.gpus,
        "cell_gpus": rec.cell_gpus,
        "prefill": b.cluster.prefill,
        "decode": b.cluster.decode,
        "local_prefill_tokens": b.cluster.local_prefill_tokens,
        "goodput_rps": _finite(b.goodput_rps),
        "goodput_per_gpu": _finite(b.per_gpu),
        "collocated_goodput_rps": _finite(c.goodput_rps),
        "unbounded": math.isinf(b.goodput_rps),  # goodput null: the SLO never binds
        "candidates": [
            {"layout": x.cluster.label(), "goodput_rps": _finite(x.goodput_rps)}
            for x in rec.candidates
        ],
    }


def _finite(x: float) -> float | None:
    """JSON has no infinity: an unbounded goodput is null (and "unbounded": true)."""
    return x if math.isfinite(x) else None


def _write(path: str | None, data: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
