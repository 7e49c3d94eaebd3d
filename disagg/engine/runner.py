"""Runs one scheduled step through the model: batch tensors in, last-token logits out.

All scheduled tokens are flattened into one row (decodes first, then prefill
chunks); per-token positions and pool slots, the decode block tables and the
prefill spans are built once per step and handed to the paged attention.
"""

from __future__ import annotations

from typing import Any

import torch

from disagg.engine.attention import (
    DecodeGroup,
    PagedMetadata,
    PrefillSpan,
    group_by_length,
    prefix_causal_mask,
    register,
)
from disagg.engine.kv_cache import KVCache
from disagg.engine.scheduler import ScheduledBatch
from disagg.kvpool.hashing import blocks_for


class ModelRunner:
    def __init__(self, model: Any, kv: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.block_size = kv.layout.block_size
        model.set_attn_implementation(register())

    def _long(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def build(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, PagedMetadata, torch.Tensor]:
        """(input_ids [1, T], position_ids [1, T], metadata, last-token indices [num_seqs])."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        for seq in batch.decodes:
            p = seq.num_computed
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_ids[p // bs] * bs + p % bs)
        meta = PagedMetadata(kv=self.kv, slot_mapping=torch.empty(0), num_decode=len(batch.decodes))
        if batch.decodes:
            self._decode_tables(batch, meta)
        last = list(range(len(batch.decodes)))
        input_ids = self._long(ids)
        positions = self._long(pos)
        slot_t = self._long(slots)
        parts_ids, parts_pos, parts_slots = [input_ids], [positions], [slot_t]
        start = len(ids)
        for seq, n in batch.prefills:
            c = seq.num_computed
            span = torch.arange(c, c + n, device=self.device)
            table = self._long(seq.block_ids[: blocks_for(c + n, bs)])
            parts_ids.append(self._long(seq.token_ids[c : c + n]))
            parts_pos.append(span)
            parts_slots.append(table[span // bs] * bs + span % bs)
            mask = prefix_causal_mask(n, c + n, self.device) if c else None
            meta.prefills.append(PrefillSpan(start, start + n, c + n, table, mask))
            start += n
            last.append(start - 1)
        meta.slot_mapping = torch.cat(parts_slots)
        return (
            torch.cat(parts_ids)[None],
            torch.cat(parts_pos)[None],
            meta,
            self._long(last),
        )

    def _decode_tables(self, batch: ScheduledBatch, meta: PagedMetadata) -> None:
        bs = self.block_size
        ctx = [s.num_computed + 1 for s in batch.decodes]
        blocks = [blocks_for(c, bs) for c in ctx]
        groups = group_by_length(blocks)
        for idx in groups:
            width = max(blocks[i] for i in idx)
            table = [batch.decodes[i].block_ids[:width] for i in idx]
            table = [row + [0] * (width - len(row)) for row in table]
            keys = torch.arange(width * bs, device=self.device)
            mask = (keys[None, :] < self._long([ctx[i] for i in idx])[:, None])[:, None, None, :]
            rows = slice(0, len(ctx)) if len(groups) == 1 else self._long(idx)
            meta.decode_groups.append(DecodeGroup(rows, self._long(table), mask))

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [num_seqs, vocab] of each scheduled sequence's last token this step."""
        input_ids, positions, meta, last = self.build(batch)
        out = self.model(
            input_ids=input_ids,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=last,
            paged=meta,
        )
        return out.logits[0]
