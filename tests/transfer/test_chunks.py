"""The chunk stream's plan and checks: every (layer, block) exactly once, bytes exact."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from disagg.engine.api import KvLayout
from disagg.transfer.chunks import Chunk, ChunkTracker, plan_chunks, write_chunks
from disagg.transfer.errors import TransferError

LAYOUT = KvLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype="float16", block_size=4)
PER = LAYOUT.bytes_per_block_per_layer  # 128 bytes of K (or V) per block per layer


@given(num_blocks=st.integers(1, 40), max_bytes=st.integers(1, 40 * 2 * PER + 7))
def test_plan_covers_each_layer_block_once_within_the_limit(
    num_blocks: int, max_bytes: int
) -> None:
    spans = list(plan_chunks(LAYOUT, num_blocks, max_bytes))
    seen = Counter((s.layer, s.first_block + i) for s in spans for i in range(s.num_blocks))
    assert set(seen) == {(la, b) for la in range(LAYOUT.num_layers) for b in range(num_blocks)}
    assert set(seen.values()) == {1}
    for s in spans:
        assert s.num_blocks >= 1
        assert s.num_blocks == 1 or 2 * PER * s.num_blocks <= max_bytes
    assert [s.layer for s in spans] == sorted(s.layer for s in spans)  # layer-major


def test_plan_limits() -> None:
    one_each = list(plan_chunks(LAYOUT, 5, 1))  # smaller than a block: still one block a chunk
    assert len(one_each) == 3 * 5 and {s.num_blocks for s in one_each} == {1}
    whole = list(plan_chunks(LAYOUT, 5, 1 << 30))  # one chunk per layer
    assert [(s.layer, s.first_block, s.num_blocks) for s in whole] == [
        (0, 0, 5),
        (1, 0, 5),
        (2, 0, 5),
    ]
    assert [s.num_blocks for s in plan_chunks(LAYOUT, 5, 2 * 2 * PER)] == [2, 2, 1] * 3
    assert list(plan_chunks(LAYOUT, 0, 4096)) == []


def test_tracker_accepts_a_full_plan_only_once() -> None:
    tracker = ChunkTracker(LAYOUT, 5)
    for s in plan_chunks(LAYOUT, 5, 2 * 2 * PER):
        assert not tracker.complete()
        tracker.accept(s.layer, s.first_block, s.num_blocks, s.num_blocks * PER, s.num_blocks * PER)
    assert tracker.complete() and tracker.bytes == 2 * PER * 5 * 3


@pytest.mark.parametrize(
    ("chunk", "match"),
    [
        ((3, 0, 1, PER, PER), "layer 3 out of range"),
        ((-1, 0, 1, PER, PER), "out of range"),
        ((0, 4, 2, 2 * PER, 2 * PER), r"blocks \[4, 6\) out of range"),
        ((0, -1, 1, PER, PER), "out of range"),
        ((0, 0, 0, 0, 0), "out of range"),
        ((0, 0, 2, 2 * PER - 1, 2 * PER), "expected 256"),
        ((0, 0, 2, 2 * PER, 2 * PER + 2), "expected 256"),
        ((0, 1, 1, PER, PER), "duplicate"),  # block 1 of layer 0 arrived already
    ],
)
def test_tracker_rejects_malformed_chunks(chunk: tuple[int, ...], match: str) -> None:
    tracker = ChunkTracker(LAYOUT, 5)
    tracker.accept(0, 0, 2, 2 * PER, 2 * PER)
    with pytest.raises(TransferError, match=match):
        tracker.accept(*chunk)
    assert tracker.bytes == 4 * PER  # nothing of a rejected chunk counted


class _Sink:
    """An engine's write side only: records what was written where."""

    def __init__(self) -> None:
        self.writes: list[tuple[list[int], int, bytes, bytes]] = []

    def write_kv(self, block_ids: list[int], layer: int, k: bytes, v: bytes) -> None:
        self.writes.append((block_ids, layer, k, v))


async def _stream(chunks: list[Chunk]) -> AsyncIterator[Chunk]:
    for c in chunks:
        yield c


def test_write_chunks_maps_indices_to_blocks_and_needs_every_block() -> None:
    dst = [40, 41, 42]
    full = [
        Chunk(la, first, n, bytes([la]) * n * PER, bytes([la + 9]) * n * PER)
        for la in range(3)
        for first, n in ((0, 2), (2, 1))
    ]
    sink = _Sink()
    moved = asyncio.run(write_chunks(_stream(full), LAYOUT, dst, sink))  # type: ignore[arg-type]
    assert moved == 2 * PER * 3 * 3
    assert [(b, la) for b, la, _, _ in sink.writes] == [
        (blocks, la) for la in range(3) for blocks in ([40, 41], [42])
    ]
    short = _Sink()
    with pytest.raises(TransferError, match="ended before every block"):
        asyncio.run(write_chunks(_stream(full[:-1]), LAYOUT, dst, short))  # type: ignore[arg-type]
    bad = [*full[:1], Chunk(0, 0, 1, bytes(PER), bytes(PER))]
    with pytest.raises(TransferError, match="duplicate"):
        asyncio.run(write_chunks(_stream(bad), LAYOUT, dst, _Sink()))  # type: ignore[arg-type]
