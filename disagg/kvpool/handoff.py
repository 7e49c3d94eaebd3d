"""KV blocks between an engine's sequences and a transfer, keyed by request id.

Two kinds of entry, each ``(block ids, tokens covered)``:

- held: a PREFILL_ONLY request's blocks once its prefill is done, kept for the
  decode side to pull until ``release``;
- imports: blocks reserved for KV arriving from a prefill worker, until a DECODE
  submit ``adopt``s them (they become the sequence's) or ``release`` frees them.

A request id has at most one entry. Every block that enters leaves exactly once:
adopted or freed. Not thread-safe: callers hold their engine's lock.
"""

from __future__ import annotations

from disagg.kvpool.allocator import BlockAllocator
from disagg.kvpool.hashing import blocks_for

Entry = tuple[list[int], int]


class KVHandoff:
    def __init__(self, allocator: BlockAllocator) -> None:
        self._allocator = allocator
        self._held: dict[str, Entry] = {}
        self._imports: dict[str, Entry] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._held or request_id in self._imports

    def __len__(self) -> int:
        return len(self._held) + len(self._imports)

    @property
    def num_held(self) -> int:
        return len(self._held)

    def hold(self, request_id: str, blocks: list[int], num_tokens: int) -> None:
        self._check_new(request_id)
        self._held[request_id] = (blocks, num_tokens)

    def held(self, request_id: str) -> Entry | None:
        """A copy of the held entry, or None."""
        entry = self._held.get(request_id)
        return (list(entry[0]), entry[1]) if entry is not None else None

    def reserve(self, request_id: str, num_tokens: int, block_size: int) -> list[int] | None:
        """Allocates blocks for num_tokens of imported KV; None when the pool cannot."""
        if num_tokens <= 0:
            raise ValueError("num_tokens must be > 0")
        self._check_new(request_id)
        need = blocks_for(num_tokens, block_size)
        if not self._allocator.can_allocate(need):
            return None
        blocks = self._allocator.allocate(need)
        self._imports[request_id] = (blocks, num_tokens)
        return list(blocks)

    def imported(self, request_id: str) -> Entry | None:
        return self._imports.get(request_id)

    def adopt(self, request_id: str) -> Entry:
        """Hands the reserved blocks over to a sequence (they leave the handoff unfreed)."""
        return self._imports.pop(request_id)

    def release(self, request_id: str) -> bool:
        """Frees the request's entry, held or imported; False when it has none."""
        entry = self._held.pop(request_id, None) or self._imports.pop(request_id, None)
        if entry is None:
            return False
        self._allocator.free_all(entry[0])
        return True

    def _check_new(self, request_id: str) -> None:
        if request_id in self:
            raise ValueError(f"request {request_id!r} already holds KV")
