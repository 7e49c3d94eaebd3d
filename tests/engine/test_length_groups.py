"""group_by_length: decode rows grouped so padding to a group's longest stays ~2x at most."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from disagg.engine.attention import group_by_length


def test_similar_lengths_stay_one_group_in_order() -> None:
    assert group_by_length([3, 1, 2, 8]) == [[0, 1, 2, 3]]  # 8 - 1 < 8 blocks: not worth a split
    assert group_by_length([5]) == [[0]]


def test_one_long_context_gets_its_own_group() -> None:
    assert group_by_length([2, 2, 94, 3, 2]) == [[0, 1, 4, 3], [2]]


@given(st.lists(st.integers(min_value=1, max_value=256), min_size=1, max_size=64))
def test_every_row_once_and_padding_bounded(blocks: list[int]) -> None:
    groups = group_by_length(blocks)
    assert sorted(i for g in groups for i in g) == list(range(len(blocks)))
    for g in groups:
        lo, hi = min(blocks[i] for i in g), max(blocks[i] for i in g)
        assert hi <= 2 * lo or hi - lo < 8
    padded = sum(len(g) * max(blocks[i] for i in g) for g in groups)
    # Never worse than one padded batch; within ~2x (+ the small-split slack) of the true cost.
    assert padded <= len(blocks) * max(blocks)
    assert padded <= 2 * sum(blocks) + 8 * len(blocks)
