"""Runs one scheduled step through the model: batch tensors in, last-token logits out.

All scheduled tokens are flattened into one row (decodes first, then prefill
chunks); per-token positions and pool slots, the decode block tables and
context lengths and the prefill spans are built once per step and handed to
the paged attention. Two runners, one per ``EngineConfig.model_impl``:

- ``NativeRunner``: the engine's own forward (``models/``). A step of decodes
  only is padded to a decode bucket (``compile.StepCompiler``) so its shapes
  are static; padding rows write nothing into the pool and are dropped.
- ``HfRunner``: the ``transformers`` module with its attention pointed at the
  pool (attention.py), as before the native path existed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
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
from disagg.engine.compile import StepCompiler
from disagg.engine.kernels import cpu as cpu_kernels
from disagg.engine.kv_cache import KVCache
from disagg.engine.models import NativeModel
from disagg.engine.scheduler import ScheduledBatch
from disagg.kvpool.hashing import blocks_for

log = logging.getLogger(__name__)


@dataclass
class StepInputs:
    ids: torch.Tensor  # long [T]
    positions: torch.Tensor  # long [T]
    meta: PagedMetadata
    last: torch.Tensor  # long [num_seqs]: each scheduled sequence's last token among the T


class ModelRunner:
    """Step tensors of a batch; subclasses run a model over them (``run``)."""

    def __init__(self, kv: KVCache, device: torch.device, decode_masks: bool) -> None:
        self.kv = kv
        self.device = device
        self.block_size = kv.layout.block_size
        self.decode_masks = decode_masks  # the transformers path attends with a bool mask
        # Decode rows in length groups (attention.group_by_length): a padded batch pays for
        # its longest row. Off where the decode attention reads each row's length only.
        self.group_decodes = True

    def _long(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def run(
        self, batch: ScheduledBatch, after_layer: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Logits [num_seqs, vocab] of each scheduled sequence's last token this step.

        after_layer(i): called once layer i's KV of a prefill step is in the pool, by
        runners that can tell (the native one); the others ignore it."""
        raise NotImplementedError

    def build(self, batch: ScheduledBatch) -> StepInputs:
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
        parts_ids, parts_pos, parts_slots = (
            [self._long(ids)],
            [self._long(pos)],
            [self._long(slots)],
        )
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
        return StepInputs(torch.cat(parts_ids), torch.cat(parts_pos), meta, self._long(last))

    def _decode_tables(self, batch: ScheduledBatch, meta: PagedMetadata) -> None:
        bs = self.block_size
        ctx = [s.num_computed + 1 for s in batch.decodes]
        blocks = [blocks_for(c, bs) for c in ctx]
        groups = group_by_length(blocks) if self.group_decodes else [list(range(len(blocks)))]
        for idx in groups:
            width = max(blocks[i] for i in idx)
            table = [batch.decodes[i].block_ids[:width] for i in idx]
            # Padded with the row's own last block, never another request's: the
            # padding is masked, but a masked NaN would still poison the product.
            table = [row + row[-1:] * (width - len(row)) for row in table]
            lens = self._long([ctx[i] for i in idx])
            mask = None
            if self.decode_masks:
                keys = torch.arange(width * bs, device=self.device)
                mask = (keys[None, :] < lens[:, None])[:, None, None, :]
            rows = slice(0, len(ctx)) if len(groups) == 1 else self._long(idx)
            meta.decode_groups.append(DecodeGroup(rows, self._long(table), lens, mask))


class HfRunner(ModelRunner):
    """A ``transformers`` model whose attention is the paged interface of attention.py."""

    def __init__(self, model: Any, kv: KVCache, device: torch.device) -> None:
        super().__init__(kv, device, decode_masks=True)
        self.model = model
        model.set_attn_implementation(register())

    @torch.inference_mode()
    def run(
        self, batch: ScheduledBatch, after_layer: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        step = self.build(batch)
        out = self.model(
            input_ids=step.ids[None],
            position_ids=step.positions[None],
            use_cache=False,
            logits_to_keep=step.last,
            paged=step.meta,
        )
        return out.logits[0]


class NativeRunner(ModelRunner):
    """The engine's own model; decode-only steps padded to a compiled bucket."""

    def __init__(
        self,
        model: NativeModel,
        kv: KVCache,
        device: torch.device,
        compiler: StepCompiler,
        decode_kernel: str = "auto",
    ) -> None:
        super().__init__(kv, device, decode_masks=False)
        self.model = model
        self.compiler = compiler
        self.decode_kernel = "torch"  # which decode attention runs: "cpp" or "torch"
        model.attention.decode = compiler.decode_attention
        if decode_kernel == "auto":
            why_not = cpu_kernels.available(device, kv.k[0].dtype)
            if why_not is None:
                model.attention.decode = cpu_kernels.paged_decode
                self.decode_kernel = "cpp"
                self.group_decodes = False  # it reads each row's own blocks: no padding cost
            else:
                log.info("decode attention: torch (C++ kernel: %s)", why_not)

    @torch.inference_mode()
    def run(
        self, batch: ScheduledBatch, after_layer: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        step = self.build(batch)
        if batch.prefills:
            fns = self.compiler.prefill_fns
            step.meta.after_layer = after_layer
            return self.model.forward(step.ids, step.positions, step.meta, step.last, fns)
        n = step.ids.shape[0]
        fns, padded = self.compiler.decode_fns(n)
        ids, positions = step.ids, step.positions
        if padded > n:
            ids = torch.nn.functional.pad(ids, (0, padded - n))
            positions = torch.nn.functional.pad(positions, (0, padded - n))
        if self.compiler.cuda_graphs:  # a new step: the last one's graph outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
            return self.model.forward(ids, positions, step.meta, None, fns)[:n].clone()
        return self.model.forward(ids, positions, step.meta, None, fns)[:n]

    @torch.inference_mode()
    def warm(self, rows: int, block: int) -> None:
        """One decode step of ``rows`` dummy rows, all at position 0 of ``block`` (which the
        caller holds): compiles that bucket. Writes garbage into ``block`` only."""
        ids = torch.zeros(rows, dtype=torch.long, device=self.device)
        positions = torch.zeros_like(ids)  # not ids itself: a graph guards on aliasing
        slots = torch.full((rows,), block * self.block_size, dtype=torch.long, device=self.device)
        table = torch.full((rows, 1), block, dtype=torch.long, device=self.device)
        group = DecodeGroup(slice(0, rows), table, torch.ones_like(ids), None)
        meta = PagedMetadata(self.kv, slots, num_decode=rows, decode_groups=[group])
        fns, _ = self.compiler.decode_fns(rows)
        if self.compiler.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        self.model.forward(ids, positions, meta, None, fns)


def make_runner(
    model: Any,
    kv: KVCache,
    device: torch.device,
    compiler: StepCompiler,
    decode_kernel: str = "auto",
) -> ModelRunner:
    if isinstance(model, NativeModel):
        return NativeRunner(model, kv, device, compiler, decode_kernel)
    return HfRunner(model, kv, device)
