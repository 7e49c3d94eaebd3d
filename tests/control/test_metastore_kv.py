"""KV handles: put/get, compare-and-set transitions, delete, list, TTL."""

from __future__ import annotations

import asyncio

from disagg.metastore.store import MetaStore
from disagg.v1 import common_pb2

from .helpers import run_async

S = common_pb2


def make_handle(
    request_id: str, state: common_pb2.KvState = S.KV_STATE_READY
) -> common_pb2.KvHandle:
    return common_pb2.KvHandle(
        request_id=request_id,
        owner_worker_id="prefill-0",
        owner_address="127.0.0.1:5000",
        block_ids=[3, 1, 4],
        num_tokens=40,
        layout=common_pb2.KvLayout(
            num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_size=16
        ),
        state=state,
        lease_expires_unix_ms=123,
        first_token_id=42,
    )


def test_put_get_delete_list(valkey_url: str) -> None:
    async def scenario() -> None:
        store = MetaStore(valkey_url)
        try:
            assert await store.get_kv_handle("r1") is None
            await store.put_kv_handle(make_handle("r1"), ttl_s=30)
            await store.put_kv_handle(make_handle("r2"), ttl_s=30)
            assert await store.get_kv_handle("r1") == make_handle("r1")
            assert [h.request_id for h in await store.list_kv_handles()] == ["r1", "r2"]
            assert await store.count_kv_keys() == 2

            assert await store.delete_kv_handle("r1") is True
            assert await store.delete_kv_handle("r1") is False
            assert await store.get_kv_handle("r1") is None
            assert await store.count_kv_keys() == 1
            await store.delete_kv_handle("r2")
            assert await store.list_kv_handles() == []
        finally:
            await store.close()

    run_async(scenario())


def test_cas_transitions(valkey_url: str) -> None:
    async def scenario() -> None:
        store = MetaStore(valkey_url)
        try:
            await store.put_kv_handle(make_handle("r1"), ttl_s=30)
            moved = await store.set_kv_state("r1", S.KV_STATE_TRANSFERRING, {S.KV_STATE_READY})
            assert moved is not None and moved.state == S.KV_STATE_TRANSFERRING
            assert moved.block_ids == [3, 1, 4]  # only the state changed

            # From the wrong state: refused, nothing written.
            again = await store.set_kv_state("r1", S.KV_STATE_TRANSFERRING, {S.KV_STATE_READY})
            assert again is None
            expired = await store.set_kv_state("r1", S.KV_STATE_EXPIRED, {S.KV_STATE_READY})
            assert expired is None
            current = await store.get_kv_handle("r1")
            assert current is not None and current.state == S.KV_STATE_TRANSFERRING

            done = await store.set_kv_state("r1", S.KV_STATE_CONSUMED, {S.KV_STATE_TRANSFERRING})
            assert done is not None and done.state == S.KV_STATE_CONSUMED
            forced = await store.set_kv_state("r1", S.KV_STATE_FAILED)  # no expectation
            assert forced is not None and forced.state == S.KV_STATE_FAILED

            assert await store.set_kv_state("missing", S.KV_STATE_FAILED) is None
        finally:
            await store.close()

    run_async(scenario())


def test_cas_keeps_ttl(valkey_url: str) -> None:
    async def scenario() -> None:
        store = MetaStore(valkey_url)
        try:
            await store.put_kv_handle(make_handle("r1"), ttl_s=0.4)
            assert await store.set_kv_state("r1", S.KV_STATE_TRANSFERRING) is not None
            await asyncio.sleep(0.6)
            assert await store.get_kv_handle("r1") is None
            assert await store.count_kv_keys() == 0
        finally:
            await store.close()

    run_async(scenario())


def test_concurrent_cas_has_one_winner(valkey_url: str) -> None:
    async def scenario() -> None:
        stores = [MetaStore(valkey_url) for _ in range(8)]
        try:
            await stores[0].put_kv_handle(make_handle("r1"), ttl_s=30)
            results = await asyncio.gather(
                *(s.set_kv_state("r1", S.KV_STATE_TRANSFERRING, {S.KV_STATE_READY}) for s in stores)
            )
            assert sum(r is not None for r in results) == 1
        finally:
            for s in stores:
                await s.close()

    run_async(scenario())
