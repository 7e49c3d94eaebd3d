"""Worker registry: registration, listing by role, TTL expiry, heartbeats across restarts."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from disagg.metastore import keys
from disagg.metastore.embedded import EmbeddedValkey
from disagg.metastore.store import Heartbeat, MetaStore, MetaStoreUnavailable
from disagg.v1 import common_pb2

from .helpers import run_async

PREFILL = common_pb2.WORKER_ROLE_PREFILL
DECODE = common_pb2.WORKER_ROLE_DECODE


def make_worker(
    worker_id: str, role: common_pb2.WorkerRole = PREFILL, free_blocks: int = 100
) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(
        worker_id=worker_id,
        role=role,
        address="127.0.0.1:1",
        model="tiny",
        free_blocks=free_blocks,
        total_blocks=128,
        layout=common_pb2.KvLayout(
            num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_size=16
        ),
    )


def test_register_and_list_by_role(valkey_url: str) -> None:
    async def scenario() -> None:
        store = MetaStore(valkey_url)
        try:
            await store.register_worker(make_worker("p0", PREFILL), ttl_s=10)
            await store.register_worker(make_worker("p1", PREFILL), ttl_s=10)
            await store.register_worker(make_worker("d0", DECODE, free_blocks=7), ttl_s=10)

            assert [w.worker_id for w in await store.list_workers()] == ["d0", "p0", "p1"]
            assert [w.worker_id for w in await store.list_workers(PREFILL)] == ["p0", "p1"]
            (d0,) = await store.list_workers(DECODE)
            assert d0 == make_worker("d0", DECODE, free_blocks=7)  # round-trips intact

            await store.register_worker(make_worker("d0", DECODE, free_blocks=3), ttl_s=10)
            assert (await store.list_workers(DECODE))[0].free_blocks == 3

            await store.remove_worker("p0")
            assert [w.worker_id for w in await store.list_workers()] == ["d0", "p1"]
        finally:
            await store.close()

    run_async(scenario())


def test_worker_expires_by_ttl_and_index_is_pruned(valkey_url: str) -> None:
    async def scenario() -> None:
        store = MetaStore(valkey_url)
        try:
            await store.register_worker(make_worker("short"), ttl_s=0.3)
            await store.register_worker(make_worker("long"), ttl_s=30)
            assert len(await store.list_workers()) == 2
            await asyncio.sleep(0.5)
            assert [w.worker_id for w in await store.list_workers()] == ["long"]
            members = await store._client.smembers(keys.WORKER_INDEX)
            assert members == {b"long"}
        finally:
            await store.close()

    run_async(scenario())


def test_list_256_workers(valkey_url: str) -> None:
    async def scenario() -> None:
        store = MetaStore(valkey_url)
        try:
            for i in range(256):
                role = PREFILL if i % 2 else DECODE
                await store.register_worker(make_worker(f"w{i:03d}", role), ttl_s=30)
            assert len(await store.list_workers()) == 256
            assert len(await store.list_workers(PREFILL)) == 128
        finally:
            await store.close()

    run_async(scenario())


def test_unavailable_is_explicit() -> None:
    async def scenario() -> None:
        store = MetaStore("redis://127.0.0.1:1/0", timeout_s=0.5)
        try:
            with pytest.raises(MetaStoreUnavailable):
                await store.ping()
            with pytest.raises(MetaStoreUnavailable):
                await store.list_workers()
        finally:
            await store.close()

    run_async(scenario())


def test_invalid_ids_rejected(valkey_url: str) -> None:
    async def scenario() -> None:
        store = MetaStore(valkey_url)
        try:
            with pytest.raises(ValueError):
                await store.register_worker(make_worker(""), ttl_s=1)
            with pytest.raises(ValueError):
                await store.get_kv_handle("a*")
        finally:
            await store.close()

    run_async(scenario())


async def _wait_for(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def test_heartbeat_survives_valkey_restart(own_valkey: EmbeddedValkey) -> None:
    beats = 0

    def info() -> common_pb2.WorkerInfo:
        nonlocal beats
        beats += 1
        return make_worker("hb0", DECODE, free_blocks=beats)

    async def scenario() -> None:
        store = MetaStore(own_valkey.url, timeout_s=0.5)
        hb = Heartbeat(store, info, period_s=0.1, ttl_s=0.5)
        try:
            await hb.start()
            (first,) = await store.list_workers()
            assert first.heartbeat_unix_ms > 0
            await _wait_for(lambda: _free_blocks_above(store, first.free_blocks))

            own_valkey.stop()  # everything registered is gone with it
            await asyncio.sleep(0.35)  # several failed beats
            assert not hb.healthy
            own_valkey.start()

            await _wait_for(lambda: _has_worker(store, "hb0"))
            assert hb.healthy
        finally:
            await hb.stop()
        assert await store.list_workers() == []
        await store.close()

    run_async(scenario())


async def _has_worker(store: MetaStore, worker_id: str) -> bool:
    return any(w.worker_id == worker_id for w in await store.list_workers())


async def _free_blocks_above(store: MetaStore, value: int) -> bool:
    return any(w.free_blocks > value for w in await store.list_workers())


def test_heartbeat_start_fails_fast_without_redis() -> None:
    async def scenario() -> None:
        store = MetaStore("redis://127.0.0.1:1/0", timeout_s=0.5)
        hb = Heartbeat(store, lambda: make_worker("x"), period_s=0.1, ttl_s=0.5)
        with pytest.raises(MetaStoreUnavailable):
            await hb.start()
        await hb.stop()  # not started: no-op
        await store.close()

    run_async(scenario())


def test_heartbeat_stop_is_prompt_while_beating(valkey_url: str) -> None:
    """stop() must end the loop even when it lands mid-command (see Heartbeat.stop)."""

    async def scenario() -> None:
        store = MetaStore(valkey_url)
        try:
            for i in range(20):
                hb = Heartbeat(store, lambda: make_worker("busy"), period_s=0.002, ttl_s=1)
                await hb.start()
                await asyncio.sleep(0.001 * (i % 5))
                await asyncio.wait_for(hb.stop(), 2)
                assert await store.list_workers() == []
        finally:
            await store.close()

    run_async(scenario())


def test_malformed_records_are_skipped_and_counted(valkey_url: str) -> None:
    """Redis is shared: garbage under a worker key, or a record that makes no sense,
    is skipped and counted; every good record is still listed."""

    async def scenario() -> None:
        store = MetaStore(valkey_url)
        try:
            await store.register_worker(make_worker("good"), ttl_s=30)
            no_address = make_worker("no-address")
            no_address.address = ""
            bad = {
                "garbage": b"\xff\xfe not a protobuf",
                "no-address": no_address.SerializeToString(),
                "no-role": make_worker("no-role", role=0).SerializeToString(),  # type: ignore[arg-type]
            }
            client = redis.Redis.from_url(valkey_url)
            for wid, value in bad.items():
                client.set(keys.worker_key(wid), value)
                client.sadd(keys.WORKER_INDEX, wid)
            client.close()
            listed = await store.list_workers()
            assert [w.worker_id for w in listed] == ["good"]
            assert store.bad_records == 3
        finally:
            await store.close()

    run_async(scenario())
