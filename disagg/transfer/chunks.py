"""KV transfer wire plan: which blocks of which layer go in each chunk.

Chunks are layer-major (all of layer 0, then layer 1, ...), so a receiver can
start on early layers while later ones are still in flight, and each chunk's
K + V bytes stay under ``max_chunk_bytes`` (one block per chunk at least).
The receiver checks that every (layer, block) arrives exactly once with the
exact byte count; anything else is a ``TransferError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from disagg.engine.api import KvLayout


class TransferError(RuntimeError):
    """A KV pull failed or delivered malformed data; the receiver must discard it."""


@dataclass(frozen=True)
class ChunkSpan:
    layer: int
    first_block: int  # index into the request's block list
    num_blocks: int


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
