"""The paged KV tensors of one worker: per layer, K and V of every block.

Layout per layer: ``[num_blocks, block_size, num_kv_heads, head_dim]``, so one
block of one layer is a contiguous slab -- the unit of transfer. Token ``t`` of a
request lives at slot ``block_table[t // block_size] * block_size + t % block_size``.
"""

from __future__ import annotations

import sys

import torch

from disagg.engine.api import KvLayout

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def blocks_for_budget(layout: KvLayout, kv_cache_mb: int) -> int:
    """How many blocks (K and V, all layers) fit in kv_cache_mb MiB."""
    per_block = 2 * layout.num_layers * layout.bytes_per_block_per_layer
    return max(1, (kv_cache_mb << 20) // per_block)


class KVCache:
    """Owns the K/V tensors; knows nothing about which request holds which block."""

    def __init__(self, layout: KvLayout, num_blocks: int, device: torch.device | str) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        shape = (num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        dtype = torch_dtype(layout.dtype)
        # Zeroed, not empty: padded gathers may read never-written slots, and
        # garbage (NaN) there would poison masked-out attention weights.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.num_layers)]

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        for b in block_ids:
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"block id {b} out of range")
        return torch.tensor(block_ids, dtype=torch.long, device=self.k[0].device)

    def read(self, block_ids: list[int], layer: int) -> tuple[bytes, bytes]:
        """Raw bytes of K and V of these blocks of one layer, C-contiguous, little-endian.

        Does not modify the cache.
        """
        idx = self._index(block_ids)
        return _to_bytes(self.k[layer][idx]), _to_bytes(self.v[layer][idx])

    def write(self, block_ids: list[int], layer: int, k: bytes, v: bytes) -> None:
        """Overwrites these blocks of one layer with raw bytes shaped like ``read``'s."""
        idx = self._index(block_ids)
        shape = (len(block_ids), *self.k[layer].shape[1:])
        expected = len(block_ids) * self.layout.bytes_per_block_per_layer
        if len(k) != expected or len(v) != expected:
            raise ValueError(f"expected {expected} bytes of K and V, got {len(k)} and {len(v)}")
        self.k[layer].index_copy_(0, idx, _from_bytes(k, self.k[layer], shape))
        self.v[layer].index_copy_(0, idx, _from_bytes(v, self.v[layer], shape))


def _to_bytes(t: torch.Tensor) -> bytes:
    if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts here
        raise RuntimeError("KV bytes are little-endian; big-endian hosts are unsupported")
    flat = t.detach().contiguous().cpu().view(torch.uint8)
    return flat.numpy().tobytes()


def _from_bytes(data: bytes, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(like.dtype).view(shape).to(like.device)
