"""Decode steps with one long context among short ones: length groups vs one padded batch.

The engine's decode attention gathers each request's KV blocks into a batch
padded to the longest context. With one 1,500-token context among 128-token
chats, one padded batch makes every chat attend over 1,500 slots; the runner
instead groups decode rows by length (``attention.group_by_length``). Both paths
run here on the same requests, rounds interleaved, so the ratio is measured in
one run: ``--batch - 1`` prompts of ``--short`` tokens plus one of ``--long``
tokens, ``--steps`` greedy decode steps each; step ms = decode-phase seconds /
steps (after the last request's first token).

    python benchmarks/mixed_context.py --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from disagg.engine import runner
from disagg.engine.api import EngineRequest, SamplingParams
from disagg.engine.attention import group_by_length
from disagg.engine.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.engine.model_loader import resolve_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import _Sink


def one_group(num_blocks: list[int], min_split_blocks: int = 8) -> list[list[int]]:
    return [list(range(len(num_blocks)))]


def decode_step_ms(eng: LLMEngine, prompts: list[list[int]], steps: int, tag: str) -> float:
    sink = _Sink(len(prompts))
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.submit(EngineRequest(f"{tag}-{i}", p, params, sink))
    if not sink.done.wait(timeout=3600):
        raise TimeoutError("run did not finish")
    start = max(ts[0] for ts in sink.times.values())
    end = max(ts[-1] for ts in sink.times.values())
    return (end - start) / steps * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--short", type=int, default=128)
    p.add_argument("--long", type=int, default=1500)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", dest="json_path", default="")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = str(resolve_model(a.model))
    bs = 16
    need = ((a.batch - 1) * (a.short + a.steps + 1) + a.long + a.steps + 1) // bs + a.batch + 8
    cfg = EngineConfig(
        model=model,
        dtype="float32",
        device="cpu",
        block_size=bs,
        num_blocks=need,
        threads=a.threads,
        max_num_seqs=a.batch,
        max_num_batched_tokens=max(2048, a.long),
    )
    eng = LLMEngine(cfg)
    eng.start()
    vocab = eng.info.vocab_size
    gen = torch.Generator().manual_seed(0)

    def prompts() -> list[list[int]]:
        lens = [a.short] * (a.batch - 1) + [a.long]
        return [torch.randint(100, vocab, (n,), generator=gen).tolist() for n in lens]

    res: dict[str, list[float]] = {"grouped": [], "padded": []}
    try:
        decode_step_ms(eng, prompts()[-3:], 2, "warm")
        for r in range(a.rounds):
            for name, fn in (("padded", one_group), ("grouped", group_by_length)):
                runner.group_by_length = fn  # type: ignore[assignment]
                res[name].append(decode_step_ms(eng, prompts(), a.steps, f"{name}{r}"))
                print(f"round {r} {name}: {res[name][-1]:.1f} ms/step", file=sys.stderr)
    finally:
        runner.group_by_length = group_by_length  # type: ignore[assignment]
        eng.stop()
    out: dict[str, Any] = {
        "workload": vars(a),
        "step_ms": {k: statistics.median(v) for k, v in res.items()},
        "rounds": res,
        "speedup": statistics.median(res["padded"]) / statistics.median(res["grouped"]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(
        f"decode step, {a.batch - 1} x {a.short} + 1 x {a.long} tokens, {a.threads} thread(s): "
        f"padded {out['step_ms']['padded']:.1f} ms, grouped {out['step_ms']['grouped']:.1f} ms "
        f"-> {out['speedup']:.2f}x"
    )
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
