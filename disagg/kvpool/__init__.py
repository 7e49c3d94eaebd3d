"""Pure-Python KV block pool bookkeeping (no torch): allocation, ref counts, prefix hashes."""

from disagg.kvpool.allocator import BlockAllocator, OutOfBlocksError, block_hash

__all__ = ["BlockAllocator", "OutOfBlocksError", "block_hash"]
