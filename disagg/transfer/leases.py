"""Held KV of prefilled requests, each under a lease: the owner's local truth.

Lifecycle of one entry (``HandoffState``; Redis only mirrors it, so a Redis
outage never strands or double-frees blocks):

1. ``hold``: PREFILLING -> READY, lease timer armed.
2. ``begin_transfer``: READY -> TRANSFERRING (one puller only); the lease is
   re-armed so a stalled pull still ends.
3. ``finish``: READY|TRANSFERRING -> CONSUMED (fetch done) or FAILED (fetch
   failed, cancelled, shutdown): the blocks are freed now.
4. The lease runs out first: -> EXPIRED, the blocks are freed.
Blocks are freed by exactly one of 3 and 4, whichever comes first: the entry is
popped before ``on_free`` runs, so the other finds nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from disagg.transfer.state import HandoffState, advance


@dataclass
class _Lease:
    state: HandoffState
    timer: asyncio.TimerHandle


class LeaseTable:
    """Not thread-safe: use it from its event loop only (timers run there too)."""

    def __init__(self, lease_s: float, on_free: Callable[[str, HandoffState], None]):
        """on_free(request_id, outcome) frees the blocks; outcome is CONSUMED|FAILED|EXPIRED."""
        self._lease_s = lease_s
        self._on_free = on_free
        self._leases: dict[str, _Lease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def state(self, request_id: str) -> HandoffState | None:
        lease = self._leases.get(request_id)
        return lease.state if lease is not None else None

    def hold(self, request_id: str) -> None:
        """Raises ValueError when the id is already held (its blocks would leak)."""
        if request_id in self._leases:
            raise ValueError(f"request {request_id!r} already holds a lease")
        state = advance(HandoffState.PREFILLING, HandoffState.READY)
        self._leases[request_id] = _Lease(state, self._arm(request_id))

    def begin_transfer(self, request_id: str) -> bool:
        """False when the id is unknown or already being pulled."""
        lease = self._leases.get(request_id)
        if lease is None or lease.state is not HandoffState.READY:
            return False
        lease.timer.cancel()
        lease.state = advance(lease.state, HandoffState.TRANSFERRING)
        lease.timer = self._arm(request_id)
        return True

    def transferring(self, request_id: str) -> bool:
        """True while a pull of request_id may still read its blocks."""
        return self.state(request_id) is HandoffState.TRANSFERRING

    def finish(self, request_id: str, consumed: bool) -> bool:
        """Frees the blocks; False when nothing was held (already freed)."""
        return self._end(request_id, HandoffState.CONSUMED if consumed else HandoffState.FAILED)

    def close(self) -> None:
        """Frees everything still held, as FAILED (the worker is going away)."""
        for request_id in list(self._leases):
            self.finish(request_id, consumed=False)

    def _arm(self, request_id: str) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(self._lease_s, self._expire, request_id)

    def _expire(self, request_id: str) -> None:
        self._end(request_id, HandoffState.EXPIRED)

    def _end(self, request_id: str, outcome: HandoffState) -> bool:
        lease = self._leases.get(request_id)
        if lease is None:
            return False
        advance(lease.state, outcome)  # checked before the pop: a bug leaves the entry intact
        del self._leases[request_id]
        lease.timer.cancel()
        self._on_free(request_id, outcome)
        return True
