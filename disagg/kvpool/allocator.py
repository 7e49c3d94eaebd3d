"""Block allocator of a paged KV pool: ids only, no tensors.

Lifecycle of a block:

1. free (uncached): on the free list, content meaningless.
2. allocated: ``allocate`` hands it out with ref count 1.
3. cached: once full and computed, its owner registers its content hash
   (``register``); ``lookup`` + ``acquire`` let another request share it (ref+1).
4. ``free`` drops one reference. At zero a cached block goes to an LRU of
   reusable-but-free blocks (still found by ``lookup``); an uncached one to the
   free list. ``allocate`` takes from the free list first, then evicts the
   least recently freed cached block (forgetting its hash).

Every operation is O(1) (``allocate(n)`` is O(n)). Freeing a block that is not
allocated raises: a double free is a bug, never silently absorbed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence


class OutOfBlocksError(RuntimeError):
    """The pool cannot satisfy an allocation right now."""


class BlockAllocator:
    """Fixed pool of ``num_blocks`` ids with ref counts and a content-hash prefix cache."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be > 0")
        self._total = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, hash kept; LRU first
        self._refs: dict[int, int] = {}  # allocated block -> ref count
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.cache_version = 0  # bumped whenever a hash is registered or evicted

    @property
    def total_blocks(self) -> int:
        return self._total

    @property
    def free_blocks(self) -> int:
        """Blocks an ``allocate`` could hand out now (free + evictable cached)."""
        return len(self._free) + len(self._evictable)

    @property
    def cached_blocks(self) -> int:
        """Blocks with a registered content hash (in use or evictable)."""
        return len(self._block_of)

    def can_allocate(self, n: int) -> bool:
        return n <= self.free_blocks

    def allocate(self, n: int = 1) -> list[int]:
        """n fresh blocks with ref count 1; raises OutOfBlocksError (allocating none) if short."""
        if n < 0:
            raise ValueError("n must be >= 0")
        if n > self.free_blocks:
            raise OutOfBlocksError(f"need {n} blocks, {self.free_blocks} free")
        return [self._take() for _ in range(n)]

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            self.cache_version += 1
        self._refs[block] = 1
        return block

    def free(self, block: int) -> None:
        """Drops one reference; raises ValueError if the block is not allocated."""
        refs = self._refs.get(block)
        if refs is None:
            raise ValueError(f"block {block} is not allocated (double free or unknown id)")
        if refs > 1:
            self._refs[block] = refs - 1
            return
        del self._refs[block]
        if block in self._hash_of:
            self._evictable[block] = None
        else:
            self._free.append(block)

    def free_all(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self.free(block)

    def ref_count(self, block: int) -> int:
        return self._refs.get(block, 0)

    # Prefix cache.

    def register(self, block: int, content_hash: bytes) -> None:
        """Marks an allocated, fully computed block as holding this content.

        If another block already holds the same content, this one stays unhashed
        (the first one keeps serving lookups).
        """
        if block not in self._refs:
            raise ValueError(f"block {block} is not allocated")
        if content_hash in self._block_of or block in self._hash_of:
            return
        self._hash_of[block] = content_hash
        self._block_of[content_hash] = block
        self.cache_version += 1

    def cached_hashes(self) -> list[bytes]:
        """The content hash of every cached block (in use or evictable), in no order."""
        return list(self._block_of)

    def lookup(self, content_hash: bytes) -> int | None:
        """The block holding this content, or None. Does not take a reference."""
        return self._block_of.get(content_hash)

    def acquire(self, block: int) -> None:
        """Takes a reference on a cached block (in use or evictable)."""
        if block in self._refs:
            self._refs[block] += 1
        elif block in self._evictable:
            del self._evictable[block]
            self._refs[block] = 1
        else:
            raise ValueError(f"block {block} is neither allocated nor cached")
