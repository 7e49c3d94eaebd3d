"""Routing policies on one mixed-length Poisson trace: round robin vs least loaded vs length aware.

Same mock workers (``--prefill`` + ``--decode``, one process, real gRPC and
heartbeats, prefill time per the mock cost model), a fresh scheduler process
per policy, the same trace replayed against each (its prompts salted per
policy, so no policy inherits another's prefix cache). The trace: Poisson
arrivals at ``--rate``; 50% short prompts (16-128 tokens), 30% a shared
1024-token system prefix (one of 4) + a short question, 20% long documents
(1500-4000 tokens); ``--max-tokens`` each.

- round_robin / least_loaded: remote prefill always, no scheduler-side queue
  (what the engines' FIFO does), no admission -- the baselines.
- length_aware: earliest expected finish with prefix hits, short prompts
  (< ``--local-prefill-tokens`` uncached) prefilled on the decode worker, and
  the scheduler's shortest-first-with-aging dispatch queue. Admission is off
  here (no SLO given to the scheduler) so every policy serves every request:
  the comparison is of routing alone.

TTFT is measured by the client (send to first token). SLO attainment = share
of requests with TTFT <= ``--slo-ttft-ms``.

``--schedulers 1,2`` runs length_aware once per replica count (replicas share
one port through SO_REUSEPORT and their loads through Redis; the client spreads
its requests over several connections): the routing quality of N replicas
against one, same trace, same workers (``p99_ttft_ratio_x2`` in the JSON).
The p99 of 400 requests is the 4th-worst TTFT: one long prompt more or less
behind another moves it by 40 %. ``--rounds R`` replays R traces (seeds
``seed`` .. ``seed + R - 1``) against every replica count, interleaved round by
round, and compares the p99 of all R x 400 TTFTs per count (each round's ratio
is reported beside it).

    python benchmarks/policy_compare.py --json /tmp/policies.json [--schedulers 1,2 --rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scheduler import CONNECTIONS, _free_port, _pct, scheduler_main, workers_main

POLICIES = ("round_robin", "least_loaded", "length_aware")


@dataclass(frozen=True)
class Item:
    at_s: float
    prompt: list[int]


def make_trace(n: int, rate: float, seed: int, salt: int) -> list[Item]:
    rng = random.Random(seed)
    prefixes = [[3 + (salt * 7919 + p * 131 + j) % 4000 for j in range(1024)] for p in range(4)]
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        kind = rng.random()
        uniq = [3 + (salt * 104729 + i * 613 + j) % 4000 for j in range(4000)]
        if kind < 0.5:
            prompt = uniq[: rng.randint(16, 128)]
        elif kind < 0.8:
            prompt = prefixes[rng.randrange(4)] + uniq[: rng.randint(16, 64)]
        else:
            prompt = uniq[: rng.randint(1500, 4000)]
        out.append(Item(t, prompt))
    return out


async def replay(
    address: str, trace: list[Item], max_tokens: int
) -> tuple[list[float], list[dict[str, Any]]]:
    """Each request's client TTFT (ms, in completion order) and what its last response said."""
    import grpc

    from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc

    ttfts: list[float] = []
    details: list[dict[str, Any]] = []
    # several connections (local subchannel pools): replicas behind one port each get some
    channels = [
        grpc.aio.insecure_channel(address, [("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CONNECTIONS)
    ]
    try:
        stubs = [scheduler_pb2_grpc.SchedulerStub(ch) for ch in channels]

        async def one(k: int, item: Item, t0: float) -> None:
            stub = stubs[k % len(stubs)]
            await asyncio.sleep(max(0.0, t0 + item.at_s - time.monotonic()))
            sent = time.monotonic()
            req = scheduler_pb2.GenerateRequest(
                prompt_token_ids=item.prompt, max_tokens=max_tokens, ignore_eos=True
            )
            first, last = None, None
            async for resp in stub.Generate(req):
                if first is None and resp.token_ids:
                    first = time.monotonic()
                last = resp
            ttfts.append(((first or time.monotonic()) - sent) * 1000)
            if last is not None:
                t = last.timings
                details.append({"index": k, "at_s": round(item.at_s, 4),
                                "prompt_tokens": len(item.prompt),
                                "cached_tokens": last.usage.cached_prompt_tokens,
                                "ttft_ms": round(ttfts[-1], 2), "queue_ms": round(t.queue_ms, 2),
                                "prefill_ms": round(t.prefill_ms, 2),
                                "kv_transfer_ms": round(t.kv_transfer_ms, 2),
                                "server_ttft_ms": round(t.ttft_ms, 2),
                                "prefill_worker": last.prefill_worker,
                                "decode_worker": last.decode_worker})  # fmt: skip

        t0 = time.monotonic() + 0.2
        await asyncio.gather(*(one(k, it, t0) for k, it in enumerate(trace)))
    finally:
        for ch in channels:
            await ch.close()
    return ttfts, details


def run_policy(
    policy: str,
    args: argparse.Namespace,
    redis_url: str,
    model: str,
    salt: int,
    replicas: int = 1,
    seed: int | None = None,
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    stop, port_q, out_q = ctx.Event(), ctx.Queue(), ctx.Queue()
    cfg: dict[str, Any] = {"redis_url": redis_url, "model": model, "port": _free_port(),
                           "http_port": -1, "policy": policy, "max_inflight": 4096,
                           "reuse_port": replicas > 1}  # fmt: skip
    if policy == "length_aware":
        cfg.update(
            local_prefill_tokens=args.local_prefill_tokens,
            prefill_dispatch_depth=1,
            prefill_ms_per_token=args.prefill_ms_per_token,
        )
    else:
        cfg.update(prefill_dispatch_depth=100_000)  # no scheduler-side queue: the engine's FIFO
    sps = [
        ctx.Process(
            target=scheduler_main,
            args=({**cfg, "replica_id": f"scheduler-{i}"}, port_q, stop, out_q, 0),
        )
        for i in range(replicas)
    ]
    for sp in sps:
        sp.start()
    ports = [port_q.get(timeout=120) for _ in sps]  # one port, shared
    address = f"127.0.0.1:{ports[0]}"
    time.sleep(1.0)
    seed = args.seed if seed is None else seed
    trace = make_trace(args.requests, args.rate, seed, salt)
    try:
        ttfts, details = asyncio.run(replay(address, trace, args.max_tokens))
    finally:  # the schedulers stop even when the replay failed (else they keep us alive)
        stop.set()
    for sp in sps:
        try:
            out_q.get(timeout=60)
        except queue.Empty:  # its shutdown hung: the deadline ended it, stacks on stderr
            print(f"a scheduler did not stop cleanly (exit code {sp.exitcode})", file=sys.stderr)
        sp.join(30)
    name = policy if replicas == 1 else f"{policy}_x{replicas}"
    if args.details:
        with open(args.details, "a") as f:
            for d in details:
                f.write(json.dumps({"policy": name, "seed": seed, **d}) + "\n")
    return _stats(name, replicas, ttfts, args)


def _stats(
    name: str, replicas: int, ttfts: list[float], args: argparse.Namespace
) -> dict[str, Any]:
    met = sum(t <= args.slo_ttft_ms for t in ttfts)
    return {
        "policy": name,
        "schedulers": replicas,
        "requests": len(ttfts),
        "mean_ttft_ms": round(statistics.fmean(ttfts), 1),
        "p50_ttft_ms": round(_pct(ttfts, 50), 1),
        "p99_ttft_ms": round(_pct(ttfts, 99), 1),
        "slo_attainment": round(met / len(ttfts), 4),
        "ttfts": ttfts,
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--rate", type=float, default=25.0, help="Poisson arrivals per second")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--slo-ttft-ms", type=float, default=300.0)
    p.add_argument("--local-prefill-tokens", type=int, default=256)
    p.add_argument("--prefill-ms-per-token", type=float, default=0.05, help="mock cost model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedulers", default="1", help="replica counts for length_aware, e.g. 1,2")
    p.add_argument(
        "--rounds", type=int, default=1, help="traces (seeds) per replica count, interleaved"
    )
    p.add_argument("--json", default="")
    p.add_argument(
        "--details", default="", help="JSONL file: one line per request (timings, workers)"
    )
    p.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run round_robin and least_loaded (--no-baselines: length_aware only)",
    )
    args = p.parse_args()

    import redis

    from disagg.metastore.embedded import start_embedded_valkey
    from disagg.mock.model import make_mock_model

    model = make_mock_model()
    valkey = start_embedded_valkey()
    ctx = mp.get_context("spawn")
    stop_w, ready = ctx.Event(), ctx.Event()
    env = {"DISAGG_MOCK_PREFILL_MS_PER_TOKEN": str(args.prefill_ms_per_token)}
    rows = []
    wp = ctx.Process(
        target=workers_main, args=(valkey.url, args.prefill, args.decode, env, ready, stop_w, 1)
    )
    try:
        with redis.Redis.from_url(valkey.url) as r:
            r.flushall()
        wp.start()
        if not ready.wait(120):
            raise RuntimeError("workers not ready")
        for salt, policy in enumerate(POLICIES):
            if args.baselines or policy == "length_aware":
                rows.append(run_policy(policy, args, valkey.url, model, salt + 1))
        counts = [int(x) for x in args.schedulers.split(",") if x.strip()]
        # per replica count, one run per round (round 0 of one replica: the row above);
        # same lengths and arrivals in a round, fresh prompt tokens in every run
        runs: dict[int, list[dict[str, Any]]] = {1: [rows[-1]]}
        salt = len(POLICIES) + 1
        for r in range(args.rounds):
            for k in (c for c in counts if c > 1 or r > 0):
                salt += 1
                run = run_policy("length_aware", args, valkey.url, model, salt, k, args.seed + r)
                runs.setdefault(k, []).append(run)
                if args.rounds == 1:
                    rows.append(run)
    finally:
        stop_w.set()
        if wp.pid is not None:
            wp.join(60)
        valkey.stop()
    if args.rounds > 1:  # every count's TTFTs over all rounds
        for k in sorted(runs):
            name = "length_aware" + (f"_x{k}" if k > 1 else "") + f"_{args.rounds}rounds"
            pooled = _stats(name, k, [t for run in runs[k] for t in run["ttfts"]], args)
            rows.append({**pooled, "round_p99_ttft_ms": [run["p99_ttft_ms"] for run in runs[k]]})
    cols = ["policy", "requests", "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "slo_attainment"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    for r in rows:
        r.pop("ttfts")
    out: dict[str, Any] = {
        "runs": rows,
        "slo_ttft_ms": args.slo_ttft_ms,
        "rate": args.rate,
        "rounds": args.rounds,
    }
    for r in rows:
        for key in ("mean_ttft_ms", "p99_ttft_ms", "slo_attainment"):
            out[f"{key}_{r['policy']}"] = r[key]
    tail = f"_{args.rounds}rounds" if args.rounds > 1 else ""
    for k in (c for c in runs if c > 1):
        one = out[f"p99_ttft_ms_length_aware{tail}"]
        out[f"p99_ttft_ratio_x{k}"] = round(out[f"p99_ttft_ms_length_aware_x{k}{tail}"] / one, 3)
        out[f"p99_ttft_ratio_x{k}_by_round"] = [
            round(x["p99_ttft_ms"] / o["p99_ttft_ms"], 3)
            for x, o in zip(runs[k], runs[1], strict=True)
        ]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
