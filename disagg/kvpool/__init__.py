"""Pure-Python KV block pool bookkeeping (no torch): allocation, ref counts, prefix hashes, handoff."""

from disagg.kvpool.allocator import BlockAllocator, OutOfBlocksError, block_hash
from disagg.kvpool.handoff import KVHandoff

__all__ = ["BlockAllocator", "KVHandoff", "OutOfBlocksError", "block_hash"]
