"""Prefix index: which worker holds the KV of which full prompt blocks (pure, in memory).

Keys are the engine's own chained block hashes (``disagg.kvpool.hashing``),
so the index names exactly the blocks a worker's prefix cache can serve.

Lifecycle of an entry:
1. ``record(worker, hashes)`` after a prompt was prefilled on ``worker``: its
   full blocks are now cached there.
2. ``hits(hashes)`` at routing: per worker, the tokens of the longest prefix of
   the prompt it holds.
3. Entries age out LRU per worker (``capacity`` blocks, the worker's pool size:
   the engine evicts at least as eagerly), and ``correct`` drops what a worker
   reported it no longer had (its ``cached_tokens`` came back short).
4. ``replace(worker, hashes)``: the worker's own published cache (every scheduler
   replica reads the same one) supersedes what this index guessed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixIndex:
    def __init__(self, default_capacity: int = 4096):
        self._default_capacity = default_capacity
        self._holders: dict[bytes, set[str]] = {}
        self._lru: dict[str, OrderedDict[bytes, None]] = {}
        self._capacity: dict[str, int] = {}

    def set_capacity(self, worker_id: str, blocks: int) -> None:
        self._capacity[worker_id] = max(1, blocks)

    def record(self, worker_id: str, hashes: Sequence[bytes]) -> None:
        lru = self._lru.setdefault(worker_id, OrderedDict())
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                self._holders.setdefault(h, set()).add(worker_id)
        cap = self._capacity.get(worker_id, self._default_capacity)
        while len(lru) > cap:
            self._forget(worker_id, lru.popitem(last=False)[0])

    def hits(self, hashes: Sequence[bytes], block_size: int) -> dict[str, int]:
        """worker id -> prompt tokens of the longest cached prefix (workers with none omitted)."""
        out: dict[str, int] = {}
        live: set[str] | None = None
        for i, h in enumerate(hashes):
            holders = self._holders.get(h)
            if not holders:
                break
            live = set(holders) if live is None else live & holders
            if not live:
                break
            for w in live:
                out[w] = (i + 1) * block_size
        return out

    def correct(self, worker_id: str, hashes: Sequence[bytes], cached_blocks: int) -> None:
        """The worker served only ``cached_blocks`` of these: forget the rest there."""
        for h in hashes[cached_blocks:]:
            if h in self._lru.get(worker_id, ()):
                del self._lru[worker_id][h]
                self._forget(worker_id, h)

    def replace(self, worker_id: str, hashes: Sequence[bytes]) -> None:
        """What the worker itself published as cached: its entries become exactly these."""
        self.drop_worker(worker_id)
        self.record(worker_id, hashes)

    def drop_worker(self, worker_id: str) -> None:
        for h in self._lru.pop(worker_id, OrderedDict()):
            self._forget(worker_id, h)

    def workers(self) -> list[str]:
        return list(self._lru)

    def _forget(self, worker_id: str, h: bytes) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(worker_id)
            if not holders:
                del self._holders[h]
