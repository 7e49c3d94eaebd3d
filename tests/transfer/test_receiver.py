"""The decode side against real engines: a sender + receiver pair moves KV and frees
everything exactly once; every failure frees the reservation and releases the owner."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from disagg.engine.api import Engine
from disagg.engine.engine import LLMEngine
from disagg.engine.testing import engine_config, prompt_of
from disagg.metastore.embedded import EmbeddedValkey
from disagg.metastore.store import MetaStore
from disagg.transfer.errors import DuplicateRequest, TransferError
from disagg.transfer.handle import Handle
from disagg.transfer.receiver import KvReceiver
from disagg.transfer.sender import KvSender
from disagg.transfer.state import HandoffState
from tests.transfer.support import (
    LocalTransport,
    assert_empty,
    decode,
    generate,
    mock_engine,
    prefill,
    sender_for,
)

S = HandoffState
PROMPT = list(range(3, 60))  # 57 tokens: 4 blocks of 16


class _Pair:
    """A prefill engine with its sender, a decode engine with its receiver."""

    def __init__(self, src: Engine, dst: Engine, timeout_s: float = 5.0, **sender_kw) -> None:  # type: ignore[no-untyped-def]
        self.src, self.dst = src, dst
        self.sender: KvSender = sender_for(src, **sender_kw)
        self.transport = LocalTransport(("owner:1", self.sender))
        self.receiver = KvReceiver(dst, self.transport, None, timeout_s)

    async def handoff(self, rid: str, prompt: list[int]) -> Handle:
        return await self.sender.hold(rid, prefill(self.src, rid, prompt))


@pytest.fixture
def engines():  # type: ignore[no-untyped-def]
    src, dst = mock_engine(), mock_engine()
    yield src, dst
    src.stop()
    dst.stop()
    assert_empty(src)
    assert_empty(dst)


def test_pair_moves_kv_commits_and_frees_everything_once(engines) -> None:  # type: ignore[no-untyped-def]
    src, dst = engines

    async def scenario() -> None:
        pair = _Pair(src, dst)
        handle = await pair.handoff("p1", PROMPT)
        result = await pair.receiver.receive("p1", handle)
        assert result.ok and result.reason == ""
        assert result.bytes == 2 * 2 * 4 * dst.info.layout.bytes_per_block_per_layer
        assert result.elapsed_ms >= 0
        await pair.receiver.settle()
        assert pair.transport.released == [("p1", True)]
        assert pair.sender.freed == {S.CONSUMED: 1, S.FAILED: 0, S.EXPIRED: 0}
        assert src.held_blocks("p1") is None
        assert dst.stats().free_blocks == dst.stats().total_blocks - 4  # reserved: the commit
        tokens = decode(dst, "p1", PROMPT, handle.first_token_id, 6)  # adopts the reservation
        assert tokens == generate(src, "ref", PROMPT, 6)  # the mock's stream, made locally

    asyncio.run(scenario())


def test_failed_fetch_frees_the_reservation_and_fails_the_handoff(engines) -> None:  # type: ignore[no-untyped-def]
    src, dst = engines

    class Broken(LocalTransport):
        async def fetch(self, handle: Handle, dst_blocks: list[int], engine: Engine) -> int:
            assert engine.stats().free_blocks == engine.stats().total_blocks - len(dst_blocks)
            raise TransferError("link down")

    async def scenario() -> None:
        pair = _Pair(src, dst)
        pair.receiver = KvReceiver(dst, Broken(("owner:1", pair.sender)), None, 5.0)
        handle = await pair.handoff("f1", PROMPT)
        result = await pair.receiver.receive("f1", handle)
        assert not result.ok and result.reason == "link down" and result.bytes == 0
        assert_empty(dst)
        await pair.receiver.settle()
        assert pair.sender.freed == {S.CONSUMED: 0, S.FAILED: 1, S.EXPIRED: 0}

    asyncio.run(scenario())


def test_timeout_short_fetch_and_freed_handle_all_fail_cleanly(engines) -> None:  # type: ignore[no-untyped-def]
    src, dst = engines

    class Stalled(LocalTransport):
        async def fetch(self, handle: Handle, dst_blocks: list[int], engine: Engine) -> int:
            await asyncio.sleep(3600)
            raise AssertionError

    class Short(LocalTransport):
        async def fetch(self, handle: Handle, dst_blocks: list[int], engine: Engine) -> int:
            return 1 + await super().fetch(handle, dst_blocks, engine)

    async def scenario() -> None:
        pair = _Pair(src, dst)
        for rid, transport, why in (
            ("t1", Stalled(("owner:1", pair.sender)), "exceeded 0.1s"),
            ("s1", Short(("owner:1", pair.sender)), "moved 4097 bytes, expected 4096"),
        ):
            receiver = KvReceiver(dst, transport, None, timeout_s=0.1)
            result = await receiver.receive(rid, await pair.handoff(rid, PROMPT))
            assert not result.ok and why in result.reason, result.reason
            assert_empty(dst)
            await receiver.settle()
        handle = await pair.handoff("e1", PROMPT)
        pair.sender.release("e1", consumed=False)  # freed (e.g. expired) before the pull
        result = await pair.receiver.receive("e1", handle)
        assert not result.ok and "no KV ready" in result.reason
        assert pair.sender.freed == {S.CONSUMED: 0, S.FAILED: 3, S.EXPIRED: 0}
        assert_empty(dst)

    asyncio.run(scenario())


def test_refusals_before_reserving(engines) -> None:  # type: ignore[no-untyped-def]
    """A layout mismatch fails the handoff; an id that holds KV here is another
    request's: DuplicateRequest, its KV and the handle both left alone."""
    src, dst = engines

    async def scenario() -> None:
        pair = _Pair(src, dst)
        handle = await pair.handoff("d1", PROMPT)
        other = dst.reserve_import("d1", 10)
        assert other is not None
        with pytest.raises(DuplicateRequest, match="already holds KV"):
            await pair.receiver.receive("d1", handle)
        await pair.receiver.settle()
        assert dst.release("d1") and src.held_blocks("d1") is not None
        assert pair.transport.released == []
        wide = dataclasses.replace(handle.layout, num_kv_heads=4)
        result = await pair.receiver.receive("d1", dataclasses.replace(handle, layout=wide))
        assert not result.ok and "layout" in result.reason
        few = dataclasses.replace(handle, block_ids=handle.block_ids[:2])
        result = await pair.receiver.receive("d2", few)
        assert not result.ok and "expected 4" in result.reason
        await pair.receiver.settle()
        assert pair.sender.freed[S.FAILED] == 1  # d1 released once; d2 found nothing
        assert pair.transport.released == [("d1", False), ("d1", False)]

    asyncio.run(scenario())


def test_unreachable_owner_loses_its_record_and_frees_by_lease(
    engines, valkey: EmbeddedValkey
) -> None:  # type: ignore[no-untyped-def]
    src, dst = engines

    async def scenario() -> None:
        store = MetaStore(valkey.url)
        try:
            sender = sender_for(src, store=store, lease_s=0.3)
            handle = await sender.hold("u1", prefill(src, "u1", PROMPT))
            nobody = LocalTransport()  # the owner cannot be reached
            receiver = KvReceiver(dst, nobody, store, timeout_s=1.0)
            result = await receiver.receive("u1", handle)
            assert not result.ok and "no sender at owner:1" in result.reason
            await receiver.settle()
            assert await store.get_kv_handle("u1") is None  # dropped by the receiver
            assert_empty(dst)
            await asyncio.sleep(0.5)
            assert sender.freed == {S.CONSUMED: 0, S.FAILED: 0, S.EXPIRED: 1}
            await sender.settle()
        finally:
            await store.close()

    asyncio.run(scenario())


def test_two_llm_engines_move_the_exact_bytes(tiny_model: str) -> None:
    src = LLMEngine(engine_config(tiny_model))
    dst = LLMEngine(engine_config(tiny_model, num_blocks=40))
    src.start()
    dst.start()
    try:
        prompt = prompt_of(45, 3)

        async def scenario() -> None:
            pair = _Pair(src, dst, max_chunk_bytes=4096)
            handle = await pair.handoff("kv1", prompt)
            blocks = list(handle.block_ids)
            layers = range(src.info.layout.num_layers)
            want = [src.read_kv(blocks, layer) for layer in layers]
            result = await pair.receiver.receive("kv1", handle)
            assert result.ok and result.bytes == sum(len(k) + len(v) for k, v in want)
            got = [dst.read_kv(pair.transport.fetched["kv1"], layer) for layer in layers]
            assert got == want
            await pair.receiver.settle()
            assert pair.sender.freed[S.CONSUMED] == 1 and src.held_blocks("kv1") is None
            tokens = decode(dst, "kv1", prompt, handle.first_token_id, 8)
            assert tokens == generate(src, "ref", prompt, 8)

        asyncio.run(scenario())
    finally:
        src.stop()
        dst.stop()
    assert_empty(src)
    assert_empty(dst)
