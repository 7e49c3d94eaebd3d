"""Inter-arrival gaps: Poisson (burstiness 1) or gamma; an infinite rate sends all at once."""

from __future__ import annotations

import math
import random


def gaps(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """n waits in seconds before each request; mean 1/rate, coefficient of variation 1/sqrt(burstiness)."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be > 0")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(n)]
