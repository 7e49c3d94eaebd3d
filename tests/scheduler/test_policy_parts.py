"""Cost model refinement, the prefix index and the aging bound of the prefill queue."""

from __future__ import annotations

import pytest

from disagg.kvpool.hashing import block_hash, prompt_hashes
from disagg.policy.cost import CostModel
from disagg.policy.prefix import PrefixIndex
from disagg.policy.queue import QueueOrder, Waiting


def test_cost_model_first_sample_sets_scale_then_ewma() -> None:
    m = CostModel(base_ms=2.0, per_token_ms=0.1)
    assert m.prefill_ms(100) == pytest.approx(12.0)
    m = m.refined(100, 24.0)  # twice the prior
    assert m.scale == pytest.approx(2.0) and m.prefill_ms(100) == pytest.approx(24.0)
    m = m.refined(100, 12.0, alpha=0.25)
    assert m.scale == pytest.approx(1.75) and m.samples == 2


def test_cost_model_converges_and_bounds_outliers() -> None:
    m = CostModel(base_ms=1.0, per_token_ms=0.01)
    for _ in range(50):
        m = m.refined(1000, 33.0)  # true cost 3x the prior
    assert m.scale == pytest.approx(3.0, rel=1e-3)
    m = m.refined(1000, 1e9)  # a stall: ratio clamped, one step of alpha
    assert m.scale < 3.0 * 0.8 + 100 * 0.2 + 1e-9


def test_prompt_hashes_match_the_engine_allocator() -> None:
    prompt = list(range(40))
    hs = prompt_hashes(prompt, 16)
    assert len(hs) == 2  # full blocks only
    assert hs[0] == block_hash(None, prompt[:16]) and hs[1] == block_hash(hs[0], prompt[16:32])


def test_prefix_index_longest_prefix_per_worker() -> None:
    idx = PrefixIndex()
    a = prompt_hashes(list(range(64)), 16)
    b = prompt_hashes(list(range(32)) + [999] * 32, 16)
    idx.record("w1", a)
    idx.record("w2", a[:2])
    assert idx.hits(a, 16) == {"w1": 64, "w2": 32}
    assert idx.hits(b, 16) == {"w1": 32, "w2": 32}  # they share the first two blocks
    assert idx.hits(prompt_hashes([7] * 64, 16), 16) == {}


def test_prefix_index_lru_capacity_correct_and_drop() -> None:
    idx = PrefixIndex()
    idx.set_capacity("w", 3)
    a = prompt_hashes(list(range(64)), 16)  # 4 blocks: the oldest falls out
    idx.record("w", a)
    assert idx.hits(a, 16) == {}  # block 0 evicted: no prefix at all
    idx.set_capacity("w", 100)
    idx.record("w", a)
    idx.correct("w", a, cached_blocks=1)
    assert idx.hits(a, 16) == {"w": 16}
    idx.drop_worker("w")
    assert idx.hits(a, 16) == {} and idx.workers() == []


def test_queue_shortest_expected_first() -> None:
    q = QueueOrder(aging=0.0, max_wait_ms=1e9)
    ws = [Waiting(0, 50.0, 0.0), Waiting(1, 5.0, 0.0), Waiting(2, 5.0, 0.0)]
    assert q.pick(ws, 10.0).key == 1  # tie on expected: arrival order


def test_queue_aging_lets_a_long_prompt_beat_later_arrivals() -> None:
    """With aging 1, a prompt 90 ms longer goes before shorts arriving 90+ ms after it."""
    q = QueueOrder(aging=1.0, max_wait_ms=1e9)
    long = Waiting(0, 100.0, 0.0)
    assert q.pick([long, Waiting(1, 10.0, 80.0)], 100.0).key == 1  # 100 > 10 + 80
    assert q.pick([long, Waiting(2, 10.0, 95.0)], 100.0).key == 0  # 100 < 10 + 95


def test_queue_wait_bound_under_a_stream_of_short_prompts() -> None:
    """A long prompt is dispatched within max_wait_ms + one service time, however many
    short ones keep arriving (simulated: one server, a short arrives every ms)."""
    q = QueueOrder(aging=0.0, max_wait_ms=200.0)  # no aging: only the bound saves it
    waiting = [Waiting(0, 500.0, 0.0)]
    now, seq, started = 0.0, 1, None
    while started is None and now < 10_000:
        waiting += [Waiting(seq + i, 2.0, now) for i in range(2)]  # 2 per 2 ms: saturating
        seq += 2
        nxt = q.pick(waiting, now)
        waiting.remove(nxt)
        if nxt.key == 0:
            started = now
        now += nxt.expected_ms
    assert started is not None and 200.0 <= started <= 200.0 + 2.0


def test_queue_bounded_waiters_go_oldest_first() -> None:
    q = QueueOrder(aging=0.0, max_wait_ms=100.0)
    a, b, c = Waiting(0, 900.0, 0.0), Waiting(1, 1.0, 50.0), Waiting(2, 800.0, 10.0)
    assert q.pick([a, b, c], 150.0).key == 0
    assert q.pick([b, c], 150.0).key == 2
