"""Flags and the top level of `disagg bench` (argparse only at import: the parser stays cheap)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import urllib.request
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("target")
    t.add_argument("--backend", choices=["openai", "grpc"], default="openai")
    t.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="HTTP server (openai backend)"
    )
    t.add_argument(
        "--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions"
    )
    t.add_argument(
        "--address", default="127.0.0.1:50051", help="scheduler gRPC address (grpc backend)"
    )
    t.add_argument("--model", help="served model name (default: the first of /v1/models)")
    t.add_argument(
        "--api-key",
        default=os.environ.get("DISAGG_API_KEY") or os.environ.get("OPENAI_API_KEY", ""),
    )
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", choices=["random", "shared-prefix", "trace"], default="random")
    w.add_argument(
        "--trace", help="JSONL: prompt | prompt_token_ids | messages, output_len, [timestamp]"
    )
    w.add_argument("--num-prompts", type=int, default=100)
    w.add_argument("--random-input-len", type=int, default=128, help="mean prompt tokens")
    w.add_argument("--random-output-len", type=int, default=64, help="mean output tokens")
    w.add_argument(
        "--random-range-ratio", type=float, default=0.0, help="lengths uniform in mean*(1 -/+ r)"
    )
    w.add_argument(
        "--prefix-len", type=int, default=64, help="shared-prefix: tokens of each shared prefix"
    )
    w.add_argument("--num-prefixes", type=int, default=1, help="shared-prefix: distinct prefixes")
    w.add_argument(
        "--vocab-size", type=int, help="token ids for random prompts (default: from the server)"
    )
    w.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="stop at EOS (default: generate exactly the asked lengths)",
    )
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--seed", type=int, default=0)
    a = p.add_argument_group("arrivals")
    a.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="requests/s (default: inf, or a trace's timestamps)",
    )
    a.add_argument(
        "--burstiness", type=float, default=1.0, help="1 = Poisson; gamma shape otherwise"
    )
    a.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    o = p.add_argument_group("output")
    o.add_argument("--slo", help="goodput SLO, e.g. ttft_ms=500,tpot_ms=50[,e2el_ms=...]")
    o.add_argument("--json", dest="json_path", help="write summary + per-request results here")
    o.add_argument("--plot", help="write TTFT / ITL distributions to this PNG")
    o.add_argument("--disable-tqdm", action="store_true")


def _get_json(url: str, api_key: str) -> Any:
    req = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def _server_model(args: argparse.Namespace) -> dict[str, Any]:
    if args.backend != "openai":
        return {}
    cards = _get_json(args.base_url.rstrip("/") + "/v1/models", args.api_key)["data"]
    if args.model:
        return next((c for c in cards if c["id"] == args.model), {"id": args.model})
    return dict(cards[0])


def _workload(args: argparse.Namespace, card: dict[str, Any]) -> list[Any]:
    from disagg.bench import workload as wl

    if args.dataset == "trace":
        if not args.trace:
            raise SystemExit("--dataset trace needs --trace PATH")
        return wl.trace_workload(args.trace, args.random_output_len, args.num_prompts)
    vocab = args.vocab_size or card.get("vocab_size")
    if not vocab:
        raise SystemExit("random prompts need --vocab-size (the server did not report one)")
    if args.dataset == "shared-prefix":
        return wl.shared_prefix_workload(
            args.num_prompts,
            args.prefix_len,
            args.num_prefixes,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            vocab,
            args.seed,
        )
    return wl.random_workload(
        args.num_prompts,
        args.random_input_len,
        args.random_output_len,
        args.random_range_ratio,
        vocab,
        args.seed,
    )


async def _run(
    args: argparse.Namespace, requests: list[Any], gaps: list[float], card: dict[str, Any]
) -> Any:
    from disagg.bench.backends import GrpcBackend, HttpBackend
    from disagg.bench.runner import run_workload

    backend: HttpBackend | GrpcBackend
    if args.backend == "openai":
        backend = HttpBackend(
            args.base_url,
            args.endpoint,
            card.get("id", ""),
            args.api_key,
            args.temperature,
            args.ignore_eos,
        )
    else:
        backend = GrpcBackend(args.address, args.api_key, args.temperature, args.ignore_eos)
    try:
        return await run_workload(
            backend.send, requests, gaps, args.max_concurrency, not args.disable_tqdm
        )
    finally:
        await backend.close()


def run(args: argparse.Namespace) -> int:
    from disagg.bench import report
    from disagg.bench.arrivals import gaps as make_gaps
    from disagg.bench.runner import trace_gaps

    try:
        slo = report.parse_slo(args.slo) if args.slo else {}
        card = _server_model(args)
        requests = _workload(args, card)
    except (ValueError, OSError) as e:
        print(f"disagg bench: {e}", file=sys.stderr)
        return 2
    replay = trace_gaps(requests) if args.request_rate is None and args.dataset == "trace" else None
    rate = math.inf if args.request_rate is None else args.request_rate
    gaps = replay or make_gaps(len(requests), rate, args.burstiness, args.seed)
    results, duration = asyncio.run(_run(args, requests, gaps, card))
    summary = report.summarize(results, duration, rate, args.max_concurrency, slo)
    print(report.table(summary))
    for err in summary.errors:
        print(f"error: {err}", file=sys.stderr)
    if args.json_path:
        config = {k: v for k, v in vars(args).items() if k not in ("api_key", "func")}
        config["request_rate"] = "inf" if math.isinf(rate) else rate
        report.write_json(args.json_path, report.to_json(summary, results, config))
    if args.plot:
        report.plot(args.plot, results, summary)
    return 0 if summary.completed else 1
