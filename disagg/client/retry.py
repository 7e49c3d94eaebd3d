"""When to retry a call, and how long to wait first (pure: no I/O, no clock).

A call is retried only when (1) its status is one of ``codes`` (UNAVAILABLE,
RESOURCE_EXHAUSTED) -- but not a message over the size limit, which grpc also
reports as RESOURCE_EXHAUSTED and which fails the same way every time --, (2) no response of it has arrived yet (a stream that
has sent tokens is never replayed), (3) tries are left, and (4) the wait
fits in what is left of the call's deadline. The wait is the server's hint
when it gave one (stretched by up to ``jitter``, never shortened), else an
exponential backoff jittered by +/- ``jitter``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from disagg.client.errors import ClientError

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# grpc's own status for a message over the limit ("Received/Sent message larger than max")
_TOO_LARGE = "message larger than max"


def permanent(error: ClientError) -> bool:
    """A failure no retry can fix although its code is retryable: the message's size."""
    return error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE in error.details.lower()


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4  # tries in all, the first included; 1 = never retry
    initial_backoff_s: float = 0.2  # the first wait when the server gives no hint
    max_backoff_s: float = 5.0  # cap of a wait without a hint
    multiplier: float = 2.0  # growth of the wait from one retry to the next
    jitter: float = 0.2  # fraction: spreads clients that failed together apart
    max_hint_s: float = 30.0  # a server hint longer than this is not waited for
    codes: frozenset[grpc.StatusCode] = RETRYABLE  # statuses worth another try

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1 or not 0 <= self.jitter < 1 or self.max_hint_s < 0:
            raise ValueError("need multiplier >= 1, 0 <= jitter < 1, max_hint_s >= 0")

    def backoff(self, retry: int, hint: float | None, rand: Callable[[], float]) -> float:
        """Seconds before retry number ``retry`` (1 = the first retry)."""
        if hint is not None:
            return hint * (1 + self.jitter * rand())
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return base * (1 + self.jitter * (2 * rand() - 1))

    def next_wait(
        self,
        attempt: int,
        error: ClientError,
        time_left_s: float | None,
        rand: Callable[[], float] = random.random,
    ) -> float | None:
        """Seconds to wait before another try after ``attempt`` tries failed with error;
        None: raise the error instead."""
        if error.code not in self.codes or attempt >= self.max_attempts or permanent(error):
            return None
        hint = error.retry_after_s
        if hint is not None and hint > self.max_hint_s:
            return None
        wait = self.backoff(attempt, hint, rand)
        if time_left_s is not None and wait >= time_left_s:
            return None
        return wait


NO_RETRY = RetryPolicy(max_attempts=1)
