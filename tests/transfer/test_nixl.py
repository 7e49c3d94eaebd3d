"""The NIXL data path without the wire: two agents, each with a KV pool registered,
READ exact blocks into exact blocks; descriptors outside a registration are refused;
the transport choice per handle; the untrusted-KV checks.

NIXL is part of the default test setup (scripts/setup.sh installs the `nixl`
extra): these tests fail, never skip, where it is missing.
"""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from disagg.engine.api import KvLayout
from disagg.engine.kv_cache import KVCache
from disagg.transfer import verify
from disagg.transfer.errors import TransferError
from disagg.transfer.handle import Handle, NixlPool
from disagg.transfer.nixl_transport import NixlAgent, desc_indices, nixl_api, pool_descs
from disagg.transfer.transport import TransportChoice

LAYOUT = KvLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_size=4)


def test_nixl_is_installed() -> None:
    assert nixl_api() is not None, (
        "the NIXL Python API is missing: scripts/setup.sh installs it (extra `nixl`, nixl-cu12)"
    )


def _pool_engine(num_blocks: int, seed: int | None = None) -> Any:
    kv = KVCache(LAYOUT, num_blocks, "cpu")
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        for t in (*kv.k, *kv.v):
            t.copy_(torch.randn(t.shape, generator=g))
    return SimpleNamespace(kv=kv, info=SimpleNamespace(layout=LAYOUT))


def test_descriptors_cover_every_block_of_every_region_in_index_order() -> None:
    pool = NixlPool("a", "DRAM", 0, (1000, 5000), (9000, 13000), 100, 3)
    descs = pool_descs(pool)
    assert descs.shape == (12, 3) and set(descs[:, 1]) == {100} and set(descs[:, 2]) == {0}
    assert list(descs[:3, 0]) == [1000, 1100, 1200] and list(descs[9:, 0]) == [13000, 13100, 13200]
    idx = desc_indices(pool, [2, 0])
    assert idx.dtype == np.int32
    # region-major: K layer 0, K layer 1, V layer 0, V layer 1; blocks in the given order
    assert list(descs[idx, 0]) == [1200, 1000, 5200, 5000, 9200, 9000, 13200, 13000]


def test_two_agents_read_exact_blocks_into_exact_blocks() -> None:
    owner_engine, reader_engine = _pool_engine(12, seed=1), _pool_engine(8)
    owner, reader = NixlAgent(owner_engine, "owner"), NixlAgent(reader_engine, "reader")
    try:
        src, dst = [5, 2, 9, 10], [0, 1, 7, 3]

        async def read() -> int:
            assert not reader.knows(owner.name)
            await reader.add_remote(owner.pool, owner.metadata)
            assert reader.knows(owner.name)
            await reader.add_remote(owner.pool, b"")  # known: no metadata needed
            return await reader.read(owner.name, src, dst)

        nbytes = asyncio.run(read())
        assert nbytes == verify.expected_bytes(LAYOUT, len(src))
        okv, rkv = owner_engine.kv, reader_engine.kv
        for o, r in zip((*okv.k, *okv.v), (*rkv.k, *rkv.v), strict=True):
            assert torch.equal(r[dst], o[src])
            untouched = [b for b in range(8) if b not in dst]
            assert not r[untouched].any()  # nothing else written
    finally:
        reader.close()
        owner.close()


def test_a_pool_the_owner_did_not_register_is_refused() -> None:
    owner_engine, reader_engine = _pool_engine(4, seed=2), _pool_engine(4)
    owner, reader = NixlAgent(owner_engine, "owner"), NixlAgent(reader_engine, "reader")
    try:
        outside = dataclasses.replace(
            owner.pool, k_addrs=tuple(a + (1 << 40) for a in owner.pool.k_addrs)
        )
        with pytest.raises(TransferError, match="not registered as described"):
            asyncio.run(reader.add_remote(outside, owner.metadata))
        assert not reader.knows(owner.name)
        renamed = dataclasses.replace(owner.pool, agent_name="someone-else")
        with pytest.raises(TransferError, match="metadata is of agent"):
            asyncio.run(reader.add_remote(renamed, owner.metadata))
        with pytest.raises(TransferError, match="no metadata"):
            asyncio.run(reader.add_remote(owner.pool, b""))
        # A relayed handle whose pool is not the one the owner itself describes.
        lying = dataclasses.replace(owner.pool, num_blocks=2)
        with pytest.raises(TransferError, match="is not agent"):
            asyncio.run(reader.add_remote(lying, owner.metadata, owner.pool))
        asyncio.run(reader.add_remote(owner.pool, owner.metadata, owner.pool))
        with pytest.raises(TransferError, match="is not agent"):  # nor at any later pull
            asyncio.run(reader.add_remote(lying, b""))
    finally:
        reader.close()
        owner.close()


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name
        self.reads_without_owner = name == "nixl"


def _handle(nixl: bool, owner: str = "p1") -> Handle:
    pool = NixlPool("agent", "DRAM", 0, (1, 2), (3, 4), 512, 8) if nixl else None
    return Handle("r", owner, "127.0.0.1:1", (0,), 4, LAYOUT, 7, nixl=pool)


def test_transport_choice_per_mode_and_handle(caplog: pytest.LogCaptureFixture) -> None:
    grpc_t, nixl_t = _Named("grpc"), _Named("nixl")
    auto = TransportChoice("auto", grpc_t, nixl_t)  # type: ignore[arg-type]
    assert auto(_handle(True)) is nixl_t and auto(_handle(False, "p2")) is grpc_t
    assert TransportChoice("auto", grpc_t, None)(_handle(True)) is grpc_t  # type: ignore[arg-type]
    assert TransportChoice("grpc", grpc_t, nixl_t)(_handle(True)) is grpc_t  # type: ignore[arg-type]
    strict = TransportChoice("nixl", grpc_t, nixl_t)  # type: ignore[arg-type]
    assert strict(_handle(True)) is nixl_t
    with pytest.raises(TransferError, match="offers no NIXL"):
        strict(_handle(False))
    with pytest.raises(ValueError, match="needs a NIXL agent"):
        TransportChoice("nixl", grpc_t, None)  # type: ignore[arg-type]
    with caplog.at_level("INFO", logger="disagg.transfer.transport"):
        caplog.clear()  # the choices above log too when an earlier test set INFO globally
        once = TransportChoice("auto", grpc_t, nixl_t)  # type: ignore[arg-type]
        for _ in range(3):
            once(_handle(True))
    assert sum("kv transport nixl from owner=p1" in r.message for r in caplog.records) == 1


def test_check_pool_refuses_what_does_not_fit_the_layout() -> None:
    good = NixlPool("a", "DRAM", 0, (1, 2), (3, 4), LAYOUT.bytes_per_block_per_layer, 8)
    verify.check_pool(good, LAYOUT, (0, 7))
    bad = {
        "K/V regions": dataclasses.replace(good, k_addrs=(1,)),
        "blocks are": dataclasses.replace(good, block_bytes=4),
        "memory type": dataclasses.replace(good, mem_type="FILE"),
    }
    for match, pool in bad.items():
        with pytest.raises(TransferError, match=match):
            verify.check_pool(pool, LAYOUT, (0,))
    with pytest.raises(TransferError, match="outside"):
        verify.check_pool(good, LAYOUT, (8,))
    with pytest.raises(TransferError, match="twice"):
        verify.check_pool(good, LAYOUT, (1, 1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_finds_one_bad_value_anywhere_and_wipe_clears_it(bad: float) -> None:
    engine = _pool_engine(10, seed=3)
    blocks = [8, 2, 3, 5]  # three runs
    verify.check_finite(engine, blocks)
    engine.kv.v[1][3, 3, 1, 7] = bad  # last slot of block 3: past any prompt, still checked
    verify.check_finite(engine, [2, 5, 8])  # block 3 not among them
    with pytest.raises(TransferError, match="NaN or Inf"):
        verify.check_finite(engine, blocks)
    before = engine.kv.k[0][4].clone()
    verify.wipe(engine, blocks)
    assert all(not t[blocks].any() for t in (*engine.kv.k, *engine.kv.v))
    assert torch.equal(engine.kv.k[0][4], before)  # other blocks untouched
    assert verify.block_runs(blocks) == [(8, 9), (2, 4), (5, 6)]


def test_a_cancelled_read_is_over_before_the_cancellation_returns() -> None:
    """The receiver frees the destination right after a cancelled fetch: no write may follow."""
    owner_engine, reader_engine = _pool_engine(64, seed=4), _pool_engine(64)
    owner, reader = NixlAgent(owner_engine, "owner"), NixlAgent(reader_engine, "reader")
    try:

        async def scenario() -> None:
            await reader.add_remote(owner.pool, owner.metadata)
            for delay in (0, 0.0001, 0.001):
                task = asyncio.create_task(
                    reader.read(owner.name, list(range(64)), list(range(64)))
                )
                await asyncio.sleep(delay)
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                verify.wipe(reader_engine, list(range(64)))
                await asyncio.sleep(0.05)  # a write still in flight would land meanwhile
                assert not any(t.any() for t in (*reader_engine.kv.k, *reader_engine.kv.v))

        asyncio.run(scenario())
    finally:
        reader.close()
        owner.close()
