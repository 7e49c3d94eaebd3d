"""Where a request goes, decided from a snapshot of the workers.

Pure: no gRPC, no Redis, no clock. The scheduler passes the registry's
snapshot plus its own in-flight accounting and gets back a decision it can log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerView:
    """What the policy knows of one worker."""

    worker_id: str
    address: str
    role: str  # prefill | decode
    free_blocks: int
    total_blocks: int
    block_size: int
    queued_prefill_tokens: int
    running: int
    inflight: int = 0  # requests the scheduler has sent and not seen finish


@dataclass(frozen=True)
class Route:
    prefill: WorkerView | None  # None: prefill on the decode worker
    decode: WorkerView
    reason: str


class NoWorker(LookupError):
    """No worker can take the request; ``field`` names the pin at fault, if any."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


def find_pinned(workers: Sequence[WorkerView], role: str, pin: str) -> WorkerView:
    for w in workers:
        if w.role == role and pin in (w.worker_id, w.address):
            return w
    raise NoWorker(
        f"{role}_worker: no {role} worker {pin!r} in the registry", field=f"{role}_worker"
    )


def blocks_needed(prompt_len: int, max_tokens: int, block_size: int) -> int:
    return -(-(prompt_len + max_tokens) // block_size)


def choose_prefill(workers: Sequence[WorkerView], prompt_len: int) -> WorkerView | None:
    """Fewest prefills in flight from us, then least queued prompt tokens (heartbeats lag);
    None when there is no prefill worker."""
    pool = [w for w in workers if w.role == "prefill"]
    if not pool:
        return None
    return min(pool, key=lambda w: (w.inflight, w.queued_prefill_tokens, w.worker_id))


def choose_decode(workers: Sequence[WorkerView], prompt_len: int, max_tokens: int) -> WorkerView:
    """Most free KV blocks after this request (then fewest running)."""
    pool = [w for w in workers if w.role == "decode"]
    if not pool:
        raise NoWorker("no decode worker is registered")
    return max(
        pool,
        key=lambda w: (
            w.free_blocks - blocks_needed(prompt_len, max_tokens, w.block_size) * (1 + w.inflight),
            -(w.running + w.inflight),
            w.worker_id,
        ),
    )


def route(
    workers: Sequence[WorkerView],
    prompt_len: int,
    max_tokens: int,
    prefill_pin: str = "",
    decode_pin: str = "",
) -> Route:
    decode = (
        find_pinned(workers, "decode", decode_pin)
        if decode_pin
        else choose_decode(workers, prompt_len, max_tokens)
    )
    if prefill_pin:
        return Route(find_pinned(workers, "prefill", prefill_pin), decode, "pinned")
    prefill = choose_prefill(workers, prompt_len)
    if prefill is None:
        return Route(None, decode, "no prefill worker: prefill on decode")
    return Route(prefill, decode, "least-loaded")
