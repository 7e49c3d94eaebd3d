"""Requests to simulate: Poisson arrivals over a mix of length classes, or a JSONL trace."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    prompt: int  # prompt tokens (all uncached: the simulator has no prefix cache)
    output: int  # tokens generated, the first one by the prefill


@dataclass(frozen=True)
class LengthClass:
    """A share of the requests, prompt and output lengths uniform in [lo, hi]."""

    weight: float
    prompt: tuple[int, int]
    output: tuple[int, int]

    def __post_init__(self) -> None:
        lo_p, hi_p = self.prompt
        lo_o, hi_o = self.output
        if self.weight <= 0 or not 1 <= lo_p <= hi_p or not 1 <= lo_o <= hi_o:
            raise ValueError(f"bad length class {self}")


def parse_mix(text: str) -> tuple[LengthClass, ...]:
    """'0.5:1350-1650:8-24,0.5:32-96:96-160' -> weight:prompt lo-hi:output lo-hi per class."""
    out = []
    for part in text.split(","):
        try:
            w, p, o = part.strip().split(":")
            plo, _, phi = p.partition("-")
            olo, _, ohi = o.partition("-")
            out.append(
                LengthClass(float(w), (int(plo), int(phi or plo)), (int(olo), int(ohi or olo)))
            )
        except ValueError as e:
            raise ValueError(
                f"bad mix entry {part!r} (weight:prompt_lo-hi:output_lo-hi): {e}"
            ) from e
    if not out:
        raise ValueError("empty mix")
    return tuple(out)


def poisson(classes: Sequence[LengthClass], rate: float, n: int, seed: int = 0) -> list[SimRequest]:
    """n requests, exponential gaps of mean 1/rate, each class drawn by weight."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    rng = random.Random(seed)
    weights = [c.weight for c in classes]
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        c = rng.choices(classes, weights)[0]
        out.append(SimRequest(t, rng.randint(*c.prompt), rng.randint(*c.output)))
    return out


def from_trace(records: Iterable[Mapping[str, Any]], default_output: int = 64) -> list[SimRequest]:
    """Trace lines (``disagg bench``'s format): input_len or prompt_token_ids, output_len, timestamp."""
    out = []
    for i, rec in enumerate(records):
        prompt = int(rec.get("input_len") or len(rec.get("prompt_token_ids") or []))
        if prompt <= 0:
            raise ValueError(f"trace record {i + 1}: needs input_len or prompt_token_ids")
        output = int(rec.get("output_len") or rec.get("max_tokens") or default_output)
        out.append(SimRequest(float(rec.get("timestamp", 0.0)), prompt, output))
    out.sort(key=lambda r: r.arrival_s)
    return out


def at_rate(requests: Sequence[SimRequest], rate: float) -> list[SimRequest]:
    """The same requests with their arrival times scaled so the mean rate is ``rate``."""
    if len(requests) < 2 or requests[-1].arrival_s <= requests[0].arrival_s:
        raise ValueError("a trace needs at least two distinct timestamps to rescale")
    t0 = requests[0].arrival_s
    span = requests[-1].arrival_s - t0
    k = (len(requests) - 1) / rate / span
    return [SimRequest((r.arrival_s - t0) * k, r.prompt, r.output) for r in requests]
