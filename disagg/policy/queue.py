"""Prefill dispatch order: shortest expected first, with aging (pure).

A waiting prefill's priority is its expected prefill time minus ``aging`` times
the time it has waited, so a long prompt gains on short ones as it waits.
Bound: once it has waited ``max_wait_ms`` it goes before everything that has
not, oldest first -- so a long prompt waits at most ``max_wait_ms`` plus the
prefills already running, whatever the stream of short prompts behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Waiting:
    key: int  # the caller's handle (arrival sequence number: the final tie-break)
    expected_ms: float  # predicted prefill time
    enqueued_ms: float  # when it started waiting (the caller's clock)


@dataclass(frozen=True)
class QueueOrder:
    aging: float = 1.0  # expected-ms of priority gained per ms waited
    max_wait_ms: float = 2000.0  # waited this long: goes first (oldest first)

    def rank(self, w: Waiting, now_ms: float) -> tuple[int, float, int]:
        waited = now_ms - w.enqueued_ms
        if waited >= self.max_wait_ms:
            return (0, w.enqueued_ms, w.key)
        return (1, w.expected_ms - self.aging * waited, w.key)

    def pick(self, waiting: Sequence[Waiting], now_ms: float) -> Waiting:
        """The entry to dispatch next; ``waiting`` must not be empty."""
        return min(waiting, key=lambda w: self.rank(w, now_ms))
