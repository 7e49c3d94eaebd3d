"""Held KV of prefilled requests, each under a lease.

Lifecycle of one handle (mirrored to Redis, but decided here, so a Redis
outage never strands or double-frees blocks):

1. ``hold``: READY, lease timer armed.
2. ``begin_transfer``: READY -> TRANSFERRING (one puller only); the lease is
   re-armed so a stalled pull still ends.
3. ``finish``: TRANSFERRING|READY -> CONSUMED (pull done) or FAILED (cancel):
   the blocks are freed now.
4. Lease runs out first: -> EXPIRED, the blocks are freed.
Blocks are freed by exactly one of 3 and 4, whichever comes first.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass


class HandleState(str, enum.Enum):
    READY = "ready"
    TRANSFERRING = "transferring"


@dataclass
class _Entry:
    state: HandleState
    timer: asyncio.TimerHandle


class LeaseTable:
    def __init__(self, lease_s: float, on_free: Callable[[str, str], None]):
        """on_free(request_id, outcome) frees the blocks; outcome is consumed|failed|expired."""
        self._lease_s = lease_s
        self._on_free = on_free
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def hold(self, request_id: str) -> None:
        self._entries[request_id] = _Entry(HandleState.READY, self._arm(request_id))

    def begin_transfer(self, request_id: str) -> bool:
        """False when the handle is unknown or already being pulled."""
        entry = self._entries.get(request_id)
        if entry is None or entry.state is not HandleState.READY:
            return False
        entry.timer.cancel()
        entry.state, entry.timer = HandleState.TRANSFERRING, self._arm(request_id)
        return True

    def transferring(self, request_id: str) -> bool:
        """True while a pull of request_id may still read its blocks."""
        entry = self._entries.get(request_id)
        return entry is not None and entry.state is HandleState.TRANSFERRING

    def finish(self, request_id: str, consumed: bool) -> bool:
        """Frees the blocks; False when nothing was held (already freed)."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return False
        entry.timer.cancel()
        self._on_free(request_id, "consumed" if consumed else "failed")
        return True

    def close(self) -> None:
        for request_id in list(self._entries):
            self.finish(request_id, consumed=False)

    def _arm(self, request_id: str) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(self._lease_s, self._expire, request_id)

    def _expire(self, request_id: str) -> None:
        if self._entries.pop(request_id, None) is not None:
            self._on_free(request_id, "expired")
