"""KV handed between a sequence and a transfer: one entry per request, freed exactly once."""

from __future__ import annotations

import pytest

from disagg.engine.api import FinishReason, RequestMode
from disagg.engine.testing import OutputCollector, prompt_of, request
from disagg.kvpool import BlockAllocator, KVHandoff
from disagg.mock.engine import MockConfig, MockEngine


def test_handoff_entries_leave_once() -> None:
    alloc = BlockAllocator(10)
    h = KVHandoff(alloc)
    blocks = h.reserve("i", 33, block_size=16)
    assert blocks is not None and len(blocks) == 3 and alloc.free_blocks == 7
    assert "i" in h and h.imported("i") == (blocks, 33)
    with pytest.raises(ValueError, match="already holds KV"):
        h.reserve("i", 1, block_size=16)
    with pytest.raises(ValueError, match="num_tokens"):
        h.reserve("j", 0, block_size=16)
    assert h.reserve("big", 8 * 16, block_size=16) is None  # 7 free: refused, nothing taken
    assert alloc.free_blocks == 7

    held = alloc.allocate(2)
    h.hold("p", held, 20)
    with pytest.raises(ValueError, match="already holds KV"):
        h.hold("p", [], 1)
    copy = h.held("p")
    assert copy is not None and copy == (held, 20) and h.num_held == 1
    copy[0].clear()  # a copy: the entry keeps its blocks
    assert h.held("p") == (held, 20)

    assert h.adopt("i") == (blocks, 33) and "i" not in h  # adopted: not freed here
    assert h.release("i") is False
    assert h.release("p") is True and h.release("p") is False
    # p's 2 blocks are back; i's 3 belong to whoever adopted them
    assert not h and h.num_held == 0 and alloc.free_blocks == 7
    alloc.free_all(blocks)
    assert alloc.free_blocks == alloc.total_blocks


def _second_prefill_of_held_id(eng) -> None:  # type: ignore[no-untyped-def]
    sink = OutputCollector()
    eng.submit(request(prompt_of(40), sink, rid="p", mode=RequestMode.PREFILL_ONLY))
    sink.wait(["p"])
    assert sink.finish("p") is FinishReason.PREFILLED
    held = eng.held_blocks("p")
    again = OutputCollector()
    eng.submit(request(prompt_of(24), again, rid="p", mode=RequestMode.PREFILL_ONLY))
    again.wait(["p"])
    assert again.finish("p") is FinishReason.ERROR
    assert "already holds KV" in (again.outputs["p"][-1].error or "")
    assert eng.held_blocks("p") == held  # the first prefill's KV is untouched
    with pytest.raises(ValueError):
        eng.reserve_import("p", 16)
    assert eng.release("p") is True
    s = eng.stats()
    assert s.held == 0 and s.free_blocks == s.total_blocks


def test_engine_refuses_a_second_prefill_of_a_held_id(make_engine) -> None:  # type: ignore[no-untyped-def]
    _second_prefill_of_held_id(make_engine())


def test_mock_engine_refuses_a_second_prefill_of_a_held_id() -> None:
    eng = MockEngine(MockConfig(num_blocks=64))
    eng.start()
    try:
        _second_prefill_of_held_id(eng)
    finally:
        eng.stop()


def test_mock_engine_decode_without_first_token_frees_the_import() -> None:
    eng = MockEngine(MockConfig(num_blocks=64))
    eng.start()
    try:
        assert eng.reserve_import("d", 40) is not None
        sink = OutputCollector()
        req = request(prompt_of(40), sink, rid="d", mode=RequestMode.DECODE)
        eng.submit(req)  # no first_token_id
        sink.wait(["d"])
        assert sink.finish("d") is FinishReason.ERROR
        s = eng.stats()
        assert s.free_blocks == s.total_blocks
    finally:
        eng.stop()
