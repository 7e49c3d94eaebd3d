"""Paged attention of the engine's own model files: reads and writes the pool directly.

The pool layout is the one ``kv_cache.py`` documents and the KV handoff moves
(per layer ``[num_blocks, block_size, kv_heads, head_dim]``); nothing here
changes it. Per layer and step (the metadata is ``attention.PagedMetadata``,
built once per step by the runner):

1. This step's post-RoPE K/V rows are written into the pool at their slots.
2. Decode rows: ``decode`` (the runner picks it) reads each row's K and V
   straight from the pool blocks its block table names, q.k, softmax, p.v --
   the context is never copied out of the pool. On CPU with an fp32 pool that
   is the C++ kernel of ``engine/kernels`` (all rows in one call); otherwise,
   per length group, with the step compiled one fused kernel (inductor:
   Triton on CUDA, C++ on CPU), uncompiled the blocks gathered
   (``index_select``) and SDPA (ADR 0002's eager best).
3. Prefill chunks: causal SDPA on the chunk's own K/V when it has no cached
   prefix; a chunk after a cached prefix gathers the prefix once per layer
   (one copy amortised over the chunk's queries) and attends with a causal
   mask offset by the prefix length.

Sliding-window layers (Mistral, Qwen2 with ``use_sliding_window``) are honoured
in both: a query at position p sees keys in (p - window, p], as transformers'
``sliding_window_overlay``. The window's blocks are not freed early.
Measurements: docs/adr/0006-native-model-path.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from disagg.engine.attention import DecodeGroup, PagedMetadata, PrefillSpan, gather_blocks

DecodeFn = Callable[..., torch.Tensor]


def fused_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    window: int,
) -> torch.Tensor:
    """q [b, H, d] over each row's pool blocks -> [b, H, d]. Meant to be compiled:

    written as broadcast products and sums so inductor fuses the block-table
    indexing into the reductions (eager, it would materialise [b, Hkv, g, L, d]).
    """
    b, width = table.shape
    _, bs, hkv, d = k_cache.shape
    g = q.shape[1] // hkv
    n = width * bs
    # Unchecked indexing: every id in a block table is a block of the pool (the
    # runner builds the tables from allocator ids), and a bounds check per
    # element costs more than the arithmetic.
    k = torch.ops.aten._unsafe_index(k_cache, [table]).view(b, n, hkv, d).permute(0, 2, 1, 3)
    v = torch.ops.aten._unsafe_index(v_cache, [table]).view(b, n, hkv, d).permute(0, 2, 1, 3)
    qf = q.view(b, hkv, g, 1, d).float()
    s = (qf * k.unsqueeze(2).float()).sum(-1) * scale  # [b, Hkv, g, L]
    pos = torch.arange(n, device=q.device)[None, :]
    keep = pos < lens[:, None]
    if window > 0:
        keep = keep & (pos >= lens[:, None] - window)
    s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = (p.unsqueeze(-1) * v.unsqueeze(2).float()).sum(3)  # [b, Hkv, g, d]
    return o.reshape(b, hkv * g, d).to(q.dtype)


def gathered_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    window: int,
) -> torch.Tensor:
    """Same contract as ``fused_decode``, eagerly: blocks gathered, then SDPA."""
    k, v = gather_blocks(k_cache, table), gather_blocks(v_cache, table)  # [b, Hkv, L, d]
    pos = torch.arange(k.shape[2], device=q.device)[None, :]
    keep = pos < lens[:, None]
    if window > 0:
        keep = keep & (pos >= lens[:, None] - window)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=keep[:, None, None, :], scale=scale, enable_gqa=True
    )
    return o.squeeze(2)


class PagedAttention:
    """Attention of every layer of one model over one pool; ``decode`` is the decode kernel."""

    def __init__(self, scale: float, windows: tuple[int, ...], decode: DecodeFn) -> None:
        self.scale = scale
        self.windows = windows  # per layer: 0 = full attention
        self.decode = decode

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PagedMetadata
    ) -> torch.Tensor:
        """q [T, H, d], k/v [T, Hkv, d] of this step's tokens (T may include padding
        rows past ``meta.slot_mapping``) -> attention output [T, H * d]."""
        k_cache, v_cache = meta.kv.k[layer], meta.kv.v[layer]
        n = meta.slot_mapping.shape[0]
        hkv, d = k.shape[1], k.shape[2]
        k_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, k[:n])
        v_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, v[:n])
        window = self.windows[layer]
        out = q.new_zeros(q.shape)
        for group in meta.decode_groups:
            out[group.rows] = self._decode_group(q, k_cache, v_cache, group, window)
        for span in meta.prefills:
            out[span.start : span.end] = self._prefill(q, k, v, k_cache, v_cache, span, window)
        return out.view(q.shape[0], -1)

    def _decode_group(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        group: DecodeGroup,
        window: int,
    ) -> torch.Tensor:
        table, lens = group.block_tables, group.context_lens
        return self.decode(q[group.rows], k_cache, v_cache, table, lens, self.scale, window)

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        span: PrefillSpan,
        window: int,
    ) -> torch.Tensor:
        qs = q[span.start : span.end].transpose(0, 1)[None]  # [1, H, n, d]
        chunk = span.end - span.start
        if span.mask is None:  # no cached prefix: the chunk's own K/V
            ks = k[span.start : span.end].transpose(0, 1)[None]
            vs = v[span.start : span.end].transpose(0, 1)[None]
            mask = None
        else:
            ks = gather_blocks(k_cache, span.block_ids)[:, : span.context_len][None]
            vs = gather_blocks(v_cache, span.block_ids)[:, : span.context_len][None]
            mask = span.mask
        if window > 0 and span.context_len > window:
            mask = window_mask(chunk, ks.shape[2], window, q.device)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True
        )
        return o[0].transpose(0, 1)


def window_mask(chunk: int, context_len: int, window: int, device: torch.device) -> torch.Tensor:
    """bool [chunk, context_len]: the last ``chunk`` queries, each seeing (p - window, p]."""
    q_pos = torch.arange(context_len - chunk, context_len, device=device)[:, None]
    k_pos = torch.arange(context_len, device=device)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)
