from __future__ import annotations

import pytest

from disagg.kvpool.allocator import BlockAllocator, OutOfBlocksError
from disagg.kvpool.hashing import block_hash


def test_allocate_and_free_counters() -> None:
    a = BlockAllocator(4)
    assert (a.free_blocks, a.total_blocks) == (4, 4)
    blocks = a.allocate(3)
    assert len(set(blocks)) == 3 and a.free_blocks == 1
    a.free_all(blocks)
    assert a.free_blocks == 4


def test_out_of_blocks_allocates_nothing() -> None:
    a = BlockAllocator(2)
    a.allocate(1)
    with pytest.raises(OutOfBlocksError):
        a.allocate(2)
    assert a.free_blocks == 1
    assert not a.can_allocate(2) and a.can_allocate(1)


def test_double_free_and_unknown_block_raise() -> None:
    a = BlockAllocator(2)
    (b,) = a.allocate(1)
    a.free(b)
    with pytest.raises(ValueError):
        a.free(b)
    with pytest.raises(ValueError):
        a.free(99)
    assert a.free_blocks == 2


def test_block_hash_is_chained_and_stable() -> None:
    h1 = block_hash(None, [1, 2, 3])
    assert h1 == block_hash(None, [1, 2, 3])
    assert block_hash(h1, [4]) != block_hash(None, [4])
    assert block_hash(None, [1, 2, 3]) != block_hash(None, [1, 2, 4])


def test_prefix_cache_share_ref_count_and_reuse_after_free() -> None:
    a = BlockAllocator(3)
    (b,) = a.allocate(1)
    h = block_hash(None, [7] * 4)
    a.register(b, h)
    assert a.lookup(h) == b
    a.acquire(b)  # a second request shares it
    assert a.ref_count(b) == 2
    a.free(b)
    a.free(b)
    assert a.free_blocks == 3  # freed but still cached
    assert a.lookup(h) == b
    a.acquire(b)  # revived from the evictable list
    assert a.free_blocks == 2 and a.ref_count(b) == 1
    a.free(b)
    with pytest.raises(ValueError):
        a.free(b)


def test_evicts_lru_cached_only_when_free_list_empty() -> None:
    a = BlockAllocator(3)
    blocks = a.allocate(3)
    hashes = [block_hash(None, [i]) for i in range(3)]
    for b, h in zip(blocks, hashes, strict=True):
        a.register(b, h)
    a.free(blocks[1])
    a.free(blocks[0])  # LRU order: blocks[1], then blocks[0]
    (fresh,) = a.allocate(1)
    assert fresh == blocks[1]
    assert a.lookup(hashes[1]) is None  # evicted: its hash is forgotten
    assert a.lookup(hashes[0]) == blocks[0]
    assert a.cached_blocks == 2
    a.free(fresh)  # unhashed now: back to the plain free list
    (again,) = a.allocate(1)
    assert again == fresh and a.lookup(hashes[0]) == blocks[0]


def test_duplicate_content_keeps_first_block() -> None:
    a = BlockAllocator(2)
    b1, b2 = a.allocate(2)
    h = block_hash(None, [1])
    a.register(b1, h)
    a.register(b2, h)
    assert a.lookup(h) == b1
    a.free_all([b1, b2])
    assert a.free_blocks == 2 and a.cached_blocks == 1


def test_acquire_unknown_and_register_unallocated_raise() -> None:
    a = BlockAllocator(2)
    with pytest.raises(ValueError):
        a.acquire(0)
    with pytest.raises(ValueError):
        a.register(0, b"x")
