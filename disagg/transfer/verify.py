"""Imported KV is untrusted until checked; a rejected import is wiped before it is freed.

Whatever moved the bytes (gRPC chunks this process wrote, a NIXL READ that UCX
wrote), the receiver checks before it commits:

1. Coverage: K and V of every layer of every block arrived (the transport's byte
   count), in this worker's layout (layers, heads, head dim, dtype, block size:
   compared at reserve), from a NIXL pool of this layout (``check_pool``).
2. Finite values: no NaN or Inf anywhere in the imported blocks -- whole blocks,
   the slots past the prompt too: a decode step's padded gather reads them under
   a mask, and a masked NaN still turns the attention product into NaN.
3. On any failure the reserved blocks are zeroed before they go back to the pool.
   So the pool only ever holds what its engine computed or an import that passed
   2, and no request's masked slots can feed NaN into its attention.

Neither check makes foreign KV trustworthy (finite garbage passes): that is why
imported blocks are never filed in the receiver's prefix cache (the engine's
DECODE adoption), so they can only affect the request that brought them.
"""

from __future__ import annotations

import torch

from disagg.engine.api import Engine, KvLayout
from disagg.engine.kv_cache import KVCache, torch_dtype
from disagg.transfer.errors import TransferError
from disagg.transfer.handle import Handle, NixlPool


def kv_pool(engine: Engine) -> KVCache | None:
    """The engine's KV tensors (``LLMEngine.kv``); None for an engine without them
    (``MockEngine``), whose KV then moves through ``read_kv``/``write_kv`` only."""
    pool = getattr(engine, "kv", None)
    return pool if isinstance(pool, KVCache) else None


def expected_bytes(layout: KvLayout, num_blocks: int) -> int:
    """K + V bytes of every layer of num_blocks blocks."""
    return 2 * layout.bytes_per_block_per_layer * layout.num_layers * num_blocks


def check_coverage(handle: Handle, nbytes: int) -> None:
    want = expected_bytes(handle.layout, len(handle.block_ids))
    if nbytes != want:
        raise TransferError(f"KV fetch moved {nbytes} bytes, expected {want}")


def check_pool(pool: NixlPool, layout: KvLayout, block_ids: tuple[int, ...]) -> None:
    """A handle's NIXL pool must describe blocks of ``layout`` and hold ``block_ids``."""
    if len(pool.k_addrs) != layout.num_layers or len(pool.v_addrs) != layout.num_layers:
        raise TransferError(
            f"NIXL pool has {len(pool.k_addrs)}/{len(pool.v_addrs)} K/V regions, "
            f"expected {layout.num_layers}"
        )
    if pool.block_bytes != layout.bytes_per_block_per_layer:
        raise TransferError(
            f"NIXL pool blocks are {pool.block_bytes} bytes, expected "
            f"{layout.bytes_per_block_per_layer}"
        )
    if pool.mem_type not in ("DRAM", "VRAM"):
        raise TransferError(f"NIXL pool memory type {pool.mem_type!r} is not DRAM or VRAM")
    if any(not 0 <= b < pool.num_blocks for b in block_ids):
        raise TransferError(f"handle block ids outside the owner's {pool.num_blocks} blocks")
    if len(set(block_ids)) != len(block_ids):
        raise TransferError("handle names a block twice")


def check_finite(engine: Engine, blocks: list[int]) -> None:
    """Raises TransferError if any imported value is NaN or Inf (one device sync).

    A float32 sum per run of contiguous blocks, on views (no copy): NaN and Inf
    propagate through it, and it reads each byte once, ~10x faster on CPU than
    ``isfinite().all()``. A sum may also overflow on huge finite values: that KV
    is rejected too, which is safe (the request is prefilled locally)."""
    pool = kv_pool(engine)
    if pool is None:
        _check_finite_bytes(engine, blocks)
        return
    total = torch.zeros((), dtype=torch.float32, device=pool.k[0].device)
    for first, end in block_runs(blocks):
        for t in (*pool.k, *pool.v):
            total += t[first:end].sum(dtype=torch.float32).abs()
    if not bool(torch.isfinite(total)):
        raise TransferError("imported KV holds NaN or Inf values")


def check_finite_parts(engine: Engine, parts: list[tuple[int, list[int]]]) -> None:
    """``check_finite`` of K and V of some layers only: (layer, blocks) parts, as a
    layer-wise import lands them."""
    pool = kv_pool(engine)
    if pool is None:
        dtype = torch_dtype(engine.info.layout.dtype)
        for layer, blocks in parts:
            for raw in engine.read_kv(blocks, layer):
                _check_raw(raw, dtype)
        return
    total = torch.zeros((), dtype=torch.float32, device=pool.k[0].device)
    for layer, blocks in parts:
        for first, end in block_runs(blocks):
            for t in (pool.k[layer], pool.v[layer]):
                total += t[first:end].sum(dtype=torch.float32).abs()
    if not bool(torch.isfinite(total)):
        raise TransferError("imported KV holds NaN or Inf values")


def block_runs(blocks: list[int]) -> list[tuple[int, int]]:
    """[first, end) ranges of consecutive block ids, in order."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs


def _check_finite_bytes(engine: Engine, blocks: list[int]) -> None:
    dtype = torch_dtype(engine.info.layout.dtype)
    for layer in range(engine.info.layout.num_layers):
        for raw in engine.read_kv(blocks, layer):
            _check_raw(raw, dtype)


def _check_raw(raw: bytes, dtype: torch.dtype) -> None:
    if raw and not bool(torch.isfinite(torch.frombuffer(bytearray(raw), dtype=dtype)).all()):
        raise TransferError("imported KV holds NaN or Inf values")


def wipe(engine: Engine, blocks: list[int]) -> None:
    """Zeroes every layer of these (reserved, not yet freed) blocks."""
    pool = kv_pool(engine)
    if pool is not None:
        idx = torch.tensor(blocks, dtype=torch.long, device=pool.k[0].device)
        for t in (*pool.k, *pool.v):
            t.index_fill_(0, idx, 0)
        return
    layout = engine.info.layout
    zeros = bytes(len(blocks) * layout.bytes_per_block_per_layer)
    for layer in range(layout.num_layers):
        engine.write_kv(blocks, layer, zeros, zeros)
