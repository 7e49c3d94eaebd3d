"""A worker's prefill cost, measured once at startup and published in its heartbeat.

Two prompt sizes of fresh random tokens (no prefix-cache hits), prefilled after
a warm-up of each, give the line ``ms = base_ms + per_token_ms * tokens`` that the
scheduler starts from before it has observed this worker (disagg.policy.cost).
Each size is measured ``REPEATS`` times and the fastest run counts: workers often
start together (``disagg up``, a rollout) and contend for the CPU, which only ever
adds time, so the minimum is the estimate that noise does not skew -- two
identical workers then publish nearly identical costs, and the scheduler does not
prefer one over the other (over a prefix hit, say) for a noisy startup.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from disagg.engine.api import Engine, EngineRequest, SamplingParams, TokenOutput

SIZES = (16, 256)  # prompt tokens of the two measured prefills
REPEATS = 5  # measurements per size; the fastest is used


@dataclass(frozen=True)
class PrefillCost:
    base_ms: float
    per_token_ms: float


def _timed_prefill(engine: Engine, request_id: str, tokens: list[int]) -> float:
    done = threading.Event()
    seen: list[TokenOutput] = []

    def on_output(out: TokenOutput) -> None:
        seen.append(out)
        if out.finish is not None:
            done.set()

    engine.submit(
        EngineRequest(request_id, tokens, SamplingParams(max_tokens=1, temperature=0), on_output)
    )
    if not done.wait(120):
        engine.abort(request_id)
        raise TimeoutError("calibration prefill did not finish")
    ms = seen[0].prefill_ms
    if ms is None or seen[-1].error:
        raise RuntimeError(f"calibration prefill failed: {seen[-1].error}")
    return ms


def calibrate_prefill(engine: Engine, seed: int = 0) -> PrefillCost:
    """Blocks for the measurement (well under a second for small models)."""
    info = engine.info
    rng = random.Random(seed)
    sizes = [max(1, min(n, info.max_context - 2)) for n in SIZES]

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, info.vocab_size) for _ in range(n)]

    for n in sizes:
        _timed_prefill(engine, f"calibrate-warmup-{n}", prompt(n))
    ms = [
        min(_timed_prefill(engine, f"calibrate-{n}-{i}", prompt(n)) for i in range(REPEATS))
        for n in sizes
    ]
    per_token = max(0.0, (ms[1] - ms[0]) / max(1, sizes[1] - sizes[0]))
    return PrefillCost(base_ms=max(0.0, ms[0] - per_token * sizes[0]), per_token_ms=per_token)
