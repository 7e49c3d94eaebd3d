"""Pure-Python KV block pool bookkeeping (no torch): allocation, ref counts, prefix hashes, handoff."""

from disagg.kvpool.allocator import BlockAllocator, OutOfBlocksError
from disagg.kvpool.handoff import KVHandoff
from disagg.kvpool.hashing import block_hash, blocks_for, prompt_hashes

__all__ = [
    "BlockAllocator",
    "KVHandoff",
    "OutOfBlocksError",
    "block_hash",
    "blocks_for",
    "prompt_hashes",
]
