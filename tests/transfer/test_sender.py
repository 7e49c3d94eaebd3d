"""The prefill side: leases free each handoff exactly once; serve checks before each read."""

from __future__ import annotations

import asyncio
import logging

import pytest

from disagg.metastore.embedded import EmbeddedValkey, start_embedded_valkey
from disagg.metastore.store import MetaStore
from disagg.transfer.errors import HandoffNotFound, TransferAborted, TransferError
from disagg.transfer.leases import LeaseTable
from disagg.transfer.state import HandoffState, state_from_pb
from tests.transfer.support import PER_BLOCK_BYTES, assert_empty, mock_engine, prefill, sender_for

S = HandoffState


class _Frees:
    """on_free of a LeaseTable: every call recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, S]] = []

    def __call__(self, request_id: str, outcome: S) -> None:
        self.calls.append((request_id, outcome))


def test_lease_table_frees_each_entry_once() -> None:
    async def scenario() -> None:
        frees = _Frees()
        table = LeaseTable(30.0, frees)
        for rid in ("a", "b", "c"):
            table.hold(rid)
        with pytest.raises(ValueError, match="already holds a lease"):
            table.hold("a")
        assert table.state("a") is S.READY and not table.transferring("a")
        assert table.begin_transfer("a") and table.transferring("a")
        assert not table.begin_transfer("a")  # one puller only
        assert not table.begin_transfer("zzz")
        assert table.finish("a", consumed=True) and not table.finish("a", consumed=True)
        assert table.finish("b", consumed=False)
        assert not table.transferring("a") and table.state("a") is None
        table.close()  # c: still held, freed as FAILED
        table.close()
        assert frees.calls == [("a", S.CONSUMED), ("b", S.FAILED), ("c", S.FAILED)]
        assert len(table) == 0

    asyncio.run(scenario())


def test_lease_expiry_frees_once_and_release_after_it_finds_nothing() -> None:
    async def scenario() -> None:
        frees = _Frees()
        table = LeaseTable(0.05, frees)
        table.hold("idle")  # never pulled
        table.hold("stalled")
        table.hold("done")
        assert table.begin_transfer("stalled")  # the pull re-arms the lease, then stalls
        assert table.finish("done", consumed=True)
        await asyncio.sleep(0.2)
        assert sorted(frees.calls) == [
            ("done", S.CONSUMED),
            ("idle", S.EXPIRED),
            ("stalled", S.EXPIRED),
        ]
        assert not table.finish("idle", consumed=True) and not table.begin_transfer("idle")
        await asyncio.sleep(0.1)  # the cancelled timer of "done" never fires
        assert len(frees.calls) == 3 and len(table) == 0

    asyncio.run(scenario())


def test_sender_serves_every_block_then_frees_once() -> None:
    engine = mock_engine()
    try:
        first = prefill(engine, "r1", list(range(3, 60)))  # 57 tokens: 4 blocks

        async def scenario() -> None:
            sender = sender_for(engine)
            assert sender.holds("r1") and len(sender) == 0
            handle = await sender.hold("r1", first)
            assert handle.num_tokens == 57 and len(handle.block_ids) == 4
            assert handle.first_token_id == first and handle.owner_address == "owner:1"
            assert handle.layout == engine.info.layout and len(sender) == 1
            chunks = [c async for c in sender.serve("r1", 2 * PER_BLOCK_BYTES * 3)]
            assert [(c.layer, c.first_block, c.num_blocks) for c in chunks] == [
                (0, 0, 3),
                (0, 3, 1),
                (1, 0, 3),
                (1, 3, 1),
            ]
            assert all(len(c.k) == len(c.v) == c.num_blocks * PER_BLOCK_BYTES for c in chunks)
            with pytest.raises(HandoffNotFound):  # already being pulled
                [c async for c in sender.serve("r1")]
            assert sender.release("r1", consumed=True) and not sender.release("r1", consumed=True)
            assert sender.freed == {S.CONSUMED: 1, S.FAILED: 0, S.EXPIRED: 0}
            assert not sender.holds("r1") and len(sender) == 0
            with pytest.raises(HandoffNotFound, match="expired, released or being pulled"):
                [c async for c in sender.serve("r1")]
            with pytest.raises(TransferError, match="holds no KV"):
                await sender.hold("r1", first)

        asyncio.run(scenario())
        assert_empty(engine)
    finally:
        engine.stop()


def test_release_mid_pull_stops_the_stream_before_another_read() -> None:
    engine = mock_engine()
    try:
        first = prefill(engine, "r2", list(range(3, 60)))

        async def scenario() -> None:
            sender = sender_for(engine)
            await sender.hold("r2", first)
            stream = sender.serve("r2", 1)  # one block per chunk
            assert (await anext(stream)).first_block == 0
            assert sender.release("r2", consumed=False)  # e.g. the request was cancelled
            with pytest.raises(TransferAborted, match="freed during the pull"):
                await anext(stream)
            assert sender.freed[S.FAILED] == 1

        asyncio.run(scenario())
        assert_empty(engine)
    finally:
        engine.stop()


def test_unpulled_handoff_expires_and_is_freed_once() -> None:
    engine = mock_engine()
    try:
        first = prefill(engine, "r3", list(range(3, 40)))

        async def scenario() -> None:
            sender = sender_for(engine, lease_s=0.05)
            await sender.hold("r3", first)
            await asyncio.sleep(0.2)
            assert sender.freed == {S.CONSUMED: 0, S.FAILED: 0, S.EXPIRED: 1}
            assert not sender.release("r3", consumed=True)
            with pytest.raises(HandoffNotFound):
                sender.begin("r3")

        asyncio.run(scenario())
        assert_empty(engine)
    finally:
        engine.stop()


def test_redis_mirrors_each_state_and_loses_the_record_at_the_end(valkey: EmbeddedValkey) -> None:
    engine = mock_engine()
    try:
        first = prefill(engine, "mirror-1", list(range(3, 40)))

        async def scenario() -> None:
            store = MetaStore(valkey.url)
            try:
                sender = sender_for(engine, store=store)
                await sender.hold("mirror-1", first)  # publishes in the background
                await sender.settle()
                record = await store.get_kv_handle("mirror-1")
                assert record is not None and state_from_pb(record.state) is S.READY
                assert list(record.block_ids) == list(engine.held_blocks("mirror-1")[0])  # type: ignore[index]
                sender.begin("mirror-1")
                await sender.settle()
                record = await store.get_kv_handle("mirror-1")
                assert record is not None and state_from_pb(record.state) is S.TRANSFERRING
                sender.release("mirror-1", consumed=True)
                await sender.settle()
                assert await store.get_kv_handle("mirror-1") is None
            finally:
                await store.close()

        asyncio.run(scenario())
        assert_empty(engine)
    finally:
        engine.stop()


def test_a_redis_outage_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    server = start_embedded_valkey()
    url = server.url
    server.stop()  # Redis is down for the whole handoff
    engine = mock_engine()
    try:
        first = prefill(engine, "dark-1", list(range(3, 40)))

        async def scenario() -> None:
            store = MetaStore(url, timeout_s=0.2, retries=0)
            try:
                sender = sender_for(engine, store=store)
                handle = await sender.hold("dark-1", first)
                assert len(handle.block_ids) == 3
                assert len([c async for c in sender.serve("dark-1")]) == 2  # one per layer
                assert sender.release("dark-1", consumed=True)
                await sender.settle()
                assert sender.freed[S.CONSUMED] == 1
            finally:
                await store.close()

        with caplog.at_level(logging.WARNING, logger="disagg.transfer.mirror"):
            asyncio.run(scenario())
        # every write failed (put, state, final state, delete); one warning says so, not four
        warned = [r for r in caplog.records if "metastore update failed" in r.message]
        assert len(warned) == 1 and warned[0].levelno == logging.WARNING
        assert_empty(engine)
    finally:
        engine.stop()
