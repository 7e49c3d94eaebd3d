"""Cost models the policy predicts with: prefill time and decode step time (pure).

A prefill takes ``base_ms + per_token_ms * uncached_tokens``: linear is what a
batched forward of a tiny to mid-size model does until it is compute-bound
(measured in ``benchmarks/engine.py``). A worker starts from a prior (the
configured defaults, or coefficients it publishes) and the scheduler refines
it online: each observed ``prefill_ms`` moves a multiplicative scale by an
EWMA, so one outlier cannot swing a worker's estimate by more than ``alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class CostModel:
    """Prefill milliseconds of one worker as a function of uncached prompt tokens."""

    base_ms: float = 2.0  # fixed cost of one prefill call (RPC, scheduling, sampling)
    per_token_ms: float = 0.05  # marginal cost of one prompt token
    scale: float = 1.0  # online correction: EWMA of observed / predicted
    samples: int = 0  # observations folded in so far

    def prefill_ms(self, tokens: int) -> float:
        return (self.base_ms + self.per_token_ms * max(0, tokens)) * self.scale

    def queue_ms(self, requests: int, tokens: int) -> float:
        """Time to drain ``requests`` prefills holding ``tokens`` uncached tokens in total."""
        return (self.base_ms * requests + self.per_token_ms * tokens) * self.scale

    def refined(self, tokens: int, observed_ms: float, alpha: float = 0.2) -> CostModel:
        """This model after observing one prefill of ``tokens`` that took ``observed_ms``."""
        unscaled = self.base_ms + self.per_token_ms * max(0, tokens)
        if unscaled <= 0 or observed_ms < 0:
            return self
        ratio = min(max(observed_ms / unscaled, 0.01), 100.0)
        a = 1.0 if self.samples == 0 else alpha  # the first sample replaces the prior's scale
        return replace(self, scale=(1 - a) * self.scale + a * ratio, samples=self.samples + 1)


@dataclass(frozen=True)
class DecodeCost:
    """Inter-token latency of a decode worker as a function of its batch size."""

    step_base_ms: float = 5.0  # one step with a batch of one
    step_per_seq_ms: float = 0.5  # marginal cost of one more sequence in the batch

    def itl_ms(self, batch: int) -> float:
        return self.step_base_ms + self.step_per_seq_ms * max(1, batch)
