"""A PREFILL_ONLY request's KV progress (``on_kv_progress``), what layer-wise streaming reads.

What a report says is in the pool must be there for good: every block a report
allows in a layer (``transfer.progress.readable``) is copied the moment it is
reported and must equal the finished prefill's KV. Reports only grow, the block
list only extends, and the last one covers every token in every layer.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from disagg.engine.api import EngineRequest, KvProgress, RequestMode, SamplingParams
from disagg.engine.testing import OutputCollector, prompt_of
from disagg.transfer.progress import Progress, readable


def test_reported_kv_is_final_and_progress_only_grows(make_engine: Any, model_impl: str) -> None:
    eng = make_engine(max_num_batched_tokens=16)
    layout = eng.info.layout
    prompt = prompt_of(70, 9)  # 5 chunks, the last block partial
    reports: list[KvProgress] = []
    snaps: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (layer, block index)

    def on_kv_progress(p: KvProgress) -> None:  # the engine thread, right after the layer
        reports.append(p)
        ready = readable(Progress(p.block_ids, p.computed, p.upto, p.layers), layout, len(prompt))
        for layer, n in enumerate(ready):
            for i in range(n):
                if (layer, i) not in snaps:
                    b = p.block_ids[i]
                    snaps[layer, i] = (eng.kv.k[layer][b].clone(), eng.kv.v[layer][b].clone())

    sink = OutputCollector()
    eng.submit(
        EngineRequest(
            "kp-1",
            prompt,
            SamplingParams(max_tokens=4),
            sink,
            RequestMode.PREFILL_ONLY,
            on_kv_progress=on_kv_progress,
        )
    )
    sink.wait(["kp-1"])
    held = eng.held_blocks("kp-1")
    assert held is not None
    blocks = held[0]
    try:
        per_step = model_impl == "transformers"  # no layer hook: one report per chunk
        assert len(reports) >= (4 if per_step else 5 * layout.num_layers)
        for a, b in itertools.pairwise(reports):
            assert (a.computed, a.upto) <= (b.computed, b.upto)
            assert b.block_ids[: len(a.block_ids)] == a.block_ids
        last = reports[-1]
        if per_step:  # the last chunk's report is the request's finish (its handle)
            assert last.computed == 64 and blocks[: len(last.block_ids)] == list(last.block_ids)
        else:
            assert (last.upto, last.layers) == (len(prompt), layout.num_layers)
            assert list(last.block_ids) == blocks
        assert snaps, "no block was ever reported complete"
        for (layer, i), (k, v) in snaps.items():
            assert torch.equal(eng.kv.k[layer][blocks[i]], k), f"layer {layer} block {i} changed"
            assert torch.equal(eng.kv.v[layer][blocks[i]], v)
    finally:
        eng.release("kp-1")


def test_progress_is_for_prefill_only_requests(make_engine: Any) -> None:
    eng = make_engine()
    sink = OutputCollector()
    eng.submit(
        EngineRequest(
            "kp-2",
            prompt_of(8, 1),
            SamplingParams(max_tokens=2),
            sink,
            on_kv_progress=lambda p: None,
        )
    )
    sink.wait(["kp-2"])
    assert "PREFILL_ONLY" in (sink.outputs["kp-2"][-1].error or "")
