"""KV as a stream of chunks: which blocks of which layer go in each, and their checks.

The helpers of transports whose bytes pass through Python (gRPC; an in-process
pair in tests). Chunks are layer-major (all of layer 0, then layer 1, ...), so
a receiver can start on early layers while later ones are still in flight, and
each chunk's K + V bytes stay under ``max_chunk_bytes`` (one block per chunk at
least). The receiver checks that every (layer, block) arrives exactly once with
the exact byte count; anything else is a ``TransferError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterator
from dataclasses import dataclass

from disagg.engine.api import Engine, KvLayout
from disagg.transfer.errors import TransferError


@dataclass(frozen=True)
class ChunkSpan:
    layer: int
    first_block: int  # index into the request's block list
    num_blocks: int


@dataclass(frozen=True)
class Chunk:
    """K and V of blocks [first_block, first_block + num_blocks) of one layer."""

    layer: int
    first_block: int  # index into the request's block list, not a pool block id
    num_blocks: int
    k: bytes  # raw [num_blocks, block_size, num_kv_heads, head_dim] in the layout's dtype
    v: bytes


def plan_chunks(layout: KvLayout, num_blocks: int, max_chunk_bytes: int) -> Iterator[ChunkSpan]:
    per_block = 2 * layout.bytes_per_block_per_layer  # K and V
    step = max(1, max_chunk_bytes // per_block)
    for layer in range(layout.num_layers):
        for first in range(0, num_blocks, step):
            yield ChunkSpan(layer, first, min(step, num_blocks - first))


class ChunkTracker:
    """Receiver-side bookkeeping: exact coverage, exact sizes."""

    def __init__(self, layout: KvLayout, num_blocks: int):
        self._layout = layout
        self._num_blocks = num_blocks
        self._seen: set[tuple[int, int]] = set()
        self.bytes = 0

    def accept(self, layer: int, first_block: int, n: int, k_len: int, v_len: int) -> None:
        if not 0 <= layer < self._layout.num_layers:
            raise TransferError(f"chunk layer {layer} out of range")
        if n <= 0 or first_block < 0 or first_block + n > self._num_blocks:
            raise TransferError(f"chunk blocks [{first_block}, {first_block + n}) out of range")
        want = n * self._layout.bytes_per_block_per_layer
        if k_len != want or v_len != want:
            raise TransferError(f"chunk of {n} blocks has {k_len}/{v_len} bytes, expected {want}")
        keys = {(layer, b) for b in range(first_block, first_block + n)}
        if keys & self._seen:
            raise TransferError(f"duplicate blocks in chunk layer {layer} first {first_block}")
        self._seen |= keys
        self.bytes += k_len + v_len

    def complete(self) -> bool:
        return len(self._seen) == self._layout.num_layers * self._num_blocks


async def write_chunks(
    chunks: AsyncIterable[Chunk], layout: KvLayout, dst_blocks: list[int], engine: Engine
) -> int:
    """Writes a chunk stream into dst_blocks, each chunk checked before it is written.

    Returns the bytes written. Raises TransferError on a malformed chunk or a
    stream that ends short. Does not free dst_blocks: their owner does."""
    tracker = ChunkTracker(layout, len(dst_blocks))
    async for c in chunks:
        tracker.accept(c.layer, c.first_block, c.num_blocks, len(c.k), len(c.v))
        engine.write_kv(dst_blocks[c.first_block : c.first_block + c.num_blocks], c.layer, c.k, c.v)
    if not tracker.complete():
        raise TransferError("KV stream ended before every block arrived")
    return tracker.bytes
