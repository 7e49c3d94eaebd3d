"""Batched sampling: greedy, temperature, top-k, top-p, per-request seeds.

Each request owns a ``torch.Generator`` seeded once (from its seed, or at random)
and draws exactly one uniform number per sampled token from it, so a seeded
request gets the same tokens whatever else shares its batch. The draw itself
is vectorized: inverse CDF over the filtered, sorted distribution.

Never out of range, whatever the logits or the temperature: a temperature
below ``MIN_TEMPERATURE`` is greedy (dividing by it would overflow every
logit to inf), NaN logits count as -inf, +inf as the largest float, and the
drawn position is clamped into the vocabulary.
"""

from __future__ import annotations

import random

import torch

from disagg.engine.api import MIN_TEMPERATURE, SamplingParams


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < MIN_TEMPERATURE


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """The per-request generator; None for greedy requests (they draw nothing)."""
    if is_greedy(params):
        return None
    g = torch.Generator()
    g.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    return g


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """One token per row of logits [B, V]; does not modify logits."""
    greedy = logits.argmax(dim=-1)  # NaN-safe: argmax of a NaN row is still an index
    rows = [i for i, p in enumerate(params) if not is_greedy(p)]
    if not rows:
        return greedy.tolist()
    sel = torch.tensor(rows, dtype=torch.long, device=logits.device)
    sub = logits.index_select(0, sel).float()
    temp = torch.tensor([params[i].temperature for i in rows], device=sub.device)
    top_k = torch.tensor([params[i].top_k for i in rows], device=sub.device)
    top_p = torch.tensor([params[i].top_p for i in rows], device=sub.device)
    uniform = torch.stack([torch.rand((), generator=generators[i]) for i in rows])
    scaled = torch.nan_to_num(sub / temp[:, None], nan=float("-inf"))
    drawn = sample_rows(scaled, top_k, top_p, uniform.to(sub.device))
    out = greedy.clone()
    out[sel] = drawn
    return out.tolist()


def sample_rows(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """One token id per row of scaled logits [R, V] (no NaN), by inverse CDF at ``uniform``."""
    scaled = scaled.clamp(max=torch.finfo(scaled.dtype).max)  # +inf would make softmax NaN
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    vocab = scaled.shape[-1]
    rank = torch.arange(vocab, device=scaled.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Nucleus: drop a token when the mass before it already reaches top_p (the top one stays).
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    cdf = probs.cumsum(dim=-1)
    target = uniform[:, None] * cdf[:, -1:]
    pos = torch.searchsorted(cdf, target, right=True)
    # Never land on a zero-probability tail entry through rounding; a row with no
    # positive probability (all -inf: NaN logits) takes its top entry.
    pos = torch.minimum(pos, (probs > 0).sum(dim=-1, keepdim=True) - 1)
    return order.gather(1, pos.clamp(0, vocab - 1)).squeeze(1)
