"""Decode attention over the paged pool: the C++ kernel against the torch paths, one run.

Paths, on the same queries, pools and block tables (SmolLM2-135M's attention
shape by default: 9 query heads, 3 KV heads, head_dim 64, 16-token blocks):

- ``kernel``: ``engine/kernels/paged_decode.cpp`` (the native path's default on CPU, fp32);
- ``fused``: ``paged_attention.fused_decode`` compiled by inductor (the default before);
- ``gathered``: blocks gathered with ``index_select``, then SDPA (the eager path).

``--engine``: the same comparison inside ``LLMEngine`` (SmolLM2 by default,
``benchmarks/engine.py``'s workload: 32 requests x 128 prompt tokens -> 128 new,
greedy fp32): one engine per decode attention (``decode_kernel`` auto = the
kernel, torch = the compiled graph), both compiled, rounds interleaved, decode
and end-to-end tok/s of each and their ratio, per round and median.

Each case runs ``--layers`` layers of distinct pools, so K and V come from memory as
in a real decode step (one layer's K/V of a batch does not stay in cache across the
step), and each row's length is drawn in [ctx / 2, ctx] (the longest = ctx). Paths
alternate round by round; ``ms_per_layer`` is the median of ``--rounds``. The
``--json`` file holds every case, each path's median and the kernel's speedups.

    python benchmarks/decode_attention.py --json benchmarks/results/decode-attention-cpu2.json
    python benchmarks/decode_attention.py --engine --rounds 3 --json engine-ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: the repo root and benchmarks/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from disagg.engine.compile import _configure, _symbolic_decode
from disagg.engine.kernels import cpu
from disagg.engine.paged_attention import fused_decode, gathered_decode

CASES = [(1, 256, 0), (8, 512, 0), (32, 192, 0), (64, 192, 0), (32, 1024, 0), (16, 2048, 0)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    why_not = cpu.available(torch.device("cpu"), torch.float32)
    if why_not is not None:
        raise SystemExit(f"the kernel is unavailable here: {why_not}")
    _configure()
    paths = {
        "kernel": cpu.paged_decode,
        "fused": _symbolic_decode(torch.compile(fused_decode)),
        "gathered": gathered_decode,
    }
    hkv, d, bs = args.kv_heads, args.head_dim, args.block_size
    results: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    for b, ctx, window in CASES:
        width = -(-ctx // bs)
        blocks = b * width + 1
        pools = [
            (
                torch.randn(blocks, bs, hkv, d, generator=gen),
                torch.randn(blocks, bs, hkv, d, generator=gen),
            )
            for _ in range(args.layers)
        ]
        table = torch.randperm(blocks, generator=gen)[: b * width].view(b, width)
        lens = torch.randint(ctx // 2, ctx + 1, (b,), generator=gen)
        lens[0] = ctx
        q = torch.randn(b, args.heads, d, generator=gen)
        ref = gathered_decode(q, *pools[0], table, lens, 0.125, window)
        samples: dict[str, list[float]] = {p: [] for p in paths}
        with torch.inference_mode():
            for fn in paths.values():  # warm (and compile) once; check equality
                out = fn(q, *pools[0], table, lens, 0.125, window)
                torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)
            for r in range(args.rounds):
                order = list(paths) if r % 2 == 0 else list(reversed(paths))
                for name in order:
                    fn = paths[name]
                    t0 = time.perf_counter()
                    for k, v in pools:
                        fn(q, k, v, table, lens, 0.125, window)
                    samples[name].append((time.perf_counter() - t0) / args.layers * 1e3)
        med = {p: statistics.median(s) for p, s in samples.items()}
        row = {
            "batch": b,
            "ctx": ctx,
            "window": window,
            "kv_mb_per_layer": round(2 * int(lens.sum()) * hkv * d * 4 / 2**20, 2),
            "ms_per_layer": {p: round(m, 4) for p, m in med.items()},
            "kernel_vs_fused": round(med["fused"] / med["kernel"], 2),
            "kernel_vs_gathered": round(med["gathered"] / med["kernel"], 2),
            "samples": samples,
        }
        results.append(row)
        print(
            f"b={b:3d} ctx={ctx:5d}  kernel {med['kernel']:.3f}  fused {med['fused']:.3f}  "
            f"gathered {med['gathered']:.3f} ms/layer  kernel x{row['kernel_vs_fused']} fused, "
            f"x{row['kernel_vs_gathered']} gathered",
            flush=True,
        )
    return {
        "shape": {"heads": args.heads, "kv_heads": hkv, "head_dim": d, "block_size": bs},
        "threads": args.threads,
        "layers": args.layers,
        "rounds": args.rounds,
        "load_avg_1m": os.getloadavg()[0],
        "cases": results,
    }


def run_engine(args: argparse.Namespace) -> dict[str, Any]:
    """Decode / end-to-end tok/s of two engines that differ only in their decode attention."""
    from engine import Workload, engine_config, engine_generate, prompts

    from disagg.engine.engine import LLMEngine
    from disagg.engine.model_loader import resolve_model

    path = args.model or resolve_model("")
    w = Workload(threads=args.threads)
    engines = {
        "kernel": LLMEngine(engine_config(path, w, decode_kernel="auto")),
        "fused": LLMEngine(engine_config(path, w, decode_kernel="torch")),
    }
    assert engines["kernel"].runner.decode_kernel == "cpp"  # type: ignore[attr-defined]
    vocab = engines["kernel"].info.vocab_size
    for eng in engines.values():
        eng.start()
        engine_generate(eng, prompts(w, vocab, 0), w.new_tokens)  # every bucket it will use
    samples: dict[str, list[float]] = {}
    for r in range(args.rounds):
        batch = prompts(w, vocab, 1 + r)  # fresh prompts: no prefix-cache hits
        for name in list(engines) if r % 2 == 0 else list(reversed(engines)):
            res = engine_generate(engines[name], batch, w.new_tokens)
            for key in ("decode_tok_s", "total_tok_s"):
                samples.setdefault(f"{name}_{key}", []).append(res[key])
            print(
                f"round {r} {name}: decode {res['decode_tok_s']:.1f} tok/s, "
                f"end to end {res['total_tok_s']:.1f}",
                flush=True,
            )
    for eng in engines.values():
        eng.stop()
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "model": path,
        "workload": {
            "requests": w.requests,
            "prompt_len": w.prompt_len,
            "new_tokens": w.new_tokens,
        },
        "threads": args.threads,
        "rounds": args.rounds,
        "load_avg_1m": os.getloadavg()[0],
        "median": med,
        "kernel_vs_fused_decode": med["kernel_decode_tok_s"] / med["fused_decode_tok_s"],
        "kernel_vs_fused_total": med["kernel_total_tok_s"] / med["fused_total_tok_s"],
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engine", action="store_true", help="compare inside LLMEngine instead")
    p.add_argument("--model", default="", help="with --engine: model directory (SmolLM2)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    res = run_engine(args) if args.engine else run(args)
    if args.engine:
        print(
            f"kernel vs fused: decode x{res['kernel_vs_fused_decode']:.2f}, "
            f"end to end x{res['kernel_vs_fused_total']:.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
