"""Paged attention plugged into transformers' attention interface.

The runner calls the model with every scheduled token of every request
flattened into one row (batch 1), ``use_cache=False``, and a ``PagedMetadata``
under the forward kwarg ``paged``; transformers passes it through to each
layer's attention function. No dense mask is ever built: the implementation
name is not in ``AttentionMaskInterface``, so ``create_causal_mask`` returns None.

Per layer the function (1) writes this step's post-RoPE K/V into the pool at
the tokens' slots, then (2) attends:

- decode tokens (the first ``num_decode`` tokens, one per request): per group of
  requests of similar context length, one batched SDPA over their blocks
  gathered into ``[b, kv_heads, L, d]`` with a length mask (grouping keeps one
  long context from padding every short one to its length);
- prefill chunks: one SDPA per request; a chunk without cached prefix attends
  to its own K/V causally, a chunk after a cached prefix gathers the prefix
  from the pool and uses a causal mask offset by the prefix length.

Choice and measurements: docs/adr/0001-paged-attention.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from disagg.engine.kv_cache import KVCache

ATTN_IMPLEMENTATION = "disagg_paged"


@dataclass
class PrefillSpan:
    """One request's prefill chunk: query tokens [start, end) of the flattened batch."""

    start: int
    end: int
    context_len: int  # tokens of KV after this chunk (cached prefix + chunk)
    block_ids: torch.Tensor  # long [ceil(context_len / block_size)]
    mask: torch.Tensor | None  # bool [chunk, context_len]; None = no prefix, plain causal


@dataclass
class DecodeGroup:
    """Decode requests attended together: their rows among the first ``num_decode`` tokens."""

    rows: slice | torch.Tensor  # a slice when the group is every decode row, in order
    block_tables: torch.Tensor  # long [b, max_blocks] (padded to the group's longest)
    context_lens: torch.Tensor  # long [b]: tokens of KV of each row, this step's included
    mask: torch.Tensor | None  # bool [b, 1, 1, max_blocks * block_size]: key < context length


@dataclass
class PagedMetadata:
    """What attention needs for one step; built once per step by the runner."""

    kv: KVCache
    slot_mapping: torch.Tensor  # long [T]: pool slot of each flattened token
    num_decode: int = 0
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillSpan] = field(default_factory=list)
    # Called with i once layer i's K and V of this step are in the pool (models
    # that run layer by layer in Python: the native forward).
    after_layer: Callable[[int], None] | None = None


def group_by_length(num_blocks: list[int], min_split_blocks: int = 8) -> list[list[int]]:
    """Indices of ``num_blocks`` in groups whose padded cost stays near the true one.

    Sorted by length, a new group starts where a request is more than twice as
    long as the group's shortest and longer by at least ``min_split_blocks``
    (below that, another SDPA call costs more than the padding it saves). So
    every group pads at most ~2x, and there are at most ~log2(longest/shortest)
    groups. One group (every index, in order) when nothing is worth splitting.
    """
    order = sorted(range(len(num_blocks)), key=num_blocks.__getitem__)
    groups: list[list[int]] = []
    for i in order:
        if groups:
            first = num_blocks[groups[-1][0]]
            n = num_blocks[i]
            if not (n > 2 * first and n - first >= min_split_blocks):
                groups[-1].append(i)
                continue
        groups.append([i])
    if len(groups) == 1:
        return [list(range(len(num_blocks)))]
    return groups


def prefix_causal_mask(chunk: int, context_len: int, device: torch.device) -> torch.Tensor:
    """bool [chunk, context_len]: query j (at position context_len - chunk + j) sees keys <= it."""
    q_pos = torch.arange(context_len - chunk, context_len, device=device)
    return torch.arange(context_len, device=device)[None, :] <= q_pos[:, None]


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """cache[block_ids] as [..., kv_heads, blocks * block_size, d].

    ``index_select`` on the flattened table, not ``cache[block_ids]``: the
    advanced-indexing kernel copies the same bytes ~1.6x slower on CPU (ADR 0002).
    """
    _, bs, h, d = cache.shape
    g = cache.index_select(0, block_ids.reshape(-1))  # [n * nb, bs, h, d]
    return g.view(*block_ids.shape[:-1], block_ids.shape[-1] * bs, h, d).transpose(-3, -2)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    paged: PagedMetadata | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, d], key/value [1, Hkv, T, d] -> output [1, T, H, d]."""
    if paged is None:
        raise RuntimeError("disagg_paged attention needs the `paged` forward kwarg")
    layer: int = module.layer_idx  # type: ignore[assignment]
    k_cache, v_cache = paged.kv.k[layer], paged.kv.v[layer]
    _, num_heads, num_tokens, head_dim = query.shape
    kv_heads = key.shape[1]
    k_tok, v_tok = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, Hkv, d]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, paged.slot_mapping, k_tok)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, paged.slot_mapping, v_tok)

    out = query.new_empty(num_tokens, num_heads, head_dim)
    for group in paged.decode_groups:
        assert group.mask is not None  # built by the runner for this path
        q = query[0, :, group.rows].transpose(0, 1).unsqueeze(2)  # [b, H, 1, d]
        k = gather_blocks(k_cache, group.block_tables)  # [b, Hkv, L, d]
        v = gather_blocks(v_cache, group.block_tables)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=group.mask, scale=scaling, enable_gqa=True
        )
        out[group.rows] = o.squeeze(2)
    for span in paged.prefills:
        q = query[:, :, span.start : span.end]
        if span.mask is None:
            k, v = key[:, :, span.start : span.end], value[:, :, span.start : span.end]
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scaling, enable_gqa=True
            )
        else:
            k = gather_blocks(k_cache, span.block_ids)[:, : span.context_len].unsqueeze(0)
            v = gather_blocks(v_cache, span.block_ids)[:, : span.context_len].unsqueeze(0)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=span.mask, scale=scaling, enable_gqa=True
            )
        out[span.start : span.end] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register() -> str:
    """Registers the paged attention with transformers (idempotent); returns its name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION
