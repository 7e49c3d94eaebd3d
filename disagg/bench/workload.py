"""Benchmark requests: random lengths, shared prefixes, or a JSONL trace.

Random and shared-prefix prompts are token ids (exact lengths, no tokenizer
needed on the client); a trace may carry text, chat messages or token ids.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BenchRequest:
    prompt: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)
    max_tokens: int = 64
    prompt_len: int = 0  # known input length in tokens (0 = unknown until the server's usage)
    timestamp: float | None = None  # trace replay: seconds after the start


def _lengths(rng: random.Random, mean: int, ratio: float) -> int:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(lo, hi)


def _ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    lo = min(1000, vocab_size // 4)  # skip the low ids, where tokenizers keep their special tokens
    return [rng.randrange(lo, vocab_size) for _ in range(n)]


def random_workload(
    n: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int, seed: int = 0
) -> list[BenchRequest]:
    """n requests with uniform lengths in mean*(1 -/+ range_ratio)."""
    if not 0 <= range_ratio < 1:
        raise ValueError("range ratio must be in [0, 1)")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = _ids(rng, _lengths(rng, input_len, range_ratio), vocab_size)
        out.append(
            BenchRequest(
                prompt_token_ids=ids,
                max_tokens=_lengths(rng, output_len, range_ratio),
                prompt_len=len(ids),
            )
        )
    return out


def shared_prefix_workload(
    n: int,
    prefix_len: int,
    num_prefixes: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab_size: int,
    seed: int = 0,
) -> list[BenchRequest]:
    """Like random_workload, each prompt led by one of num_prefixes shared prefixes of prefix_len tokens."""
    rng = random.Random(seed)
    prefixes = [_ids(rng, prefix_len, vocab_size) for _ in range(max(1, num_prefixes))]
    out = []
    for r in random_workload(n, input_len, output_len, range_ratio, vocab_size, seed + 1):
        ids = rng.choice(prefixes) + r.prompt_token_ids
        out.append(BenchRequest(prompt_token_ids=ids, max_tokens=r.max_tokens, prompt_len=len(ids)))
    return out


def _trace_record(i: int, rec: Any, default_output_len: int) -> BenchRequest:
    if not isinstance(rec, dict):
        raise ValueError(f"trace line {i + 1}: not a JSON object")
    max_tokens = int(rec.get("output_len") or rec.get("max_tokens") or default_output_len)
    ts = rec.get("timestamp")
    ids = [int(t) for t in rec.get("prompt_token_ids") or []]
    return BenchRequest(
        prompt=str(rec.get("prompt") or ""),
        prompt_token_ids=ids,
        messages=list(rec.get("messages") or []),
        max_tokens=max_tokens,
        prompt_len=len(ids) or int(rec.get("input_len") or 0),
        timestamp=float(ts) if ts is not None else None,
    )


def trace_workload(
    path: str, default_output_len: int, limit: int | None = None
) -> list[BenchRequest]:
    """One request per JSONL line: prompt | prompt_token_ids | messages, output_len, optional timestamp."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                out.append(_trace_record(i, json.loads(line), default_output_len))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"{path}: empty trace")
    return out
